# Command-line flags of the OSTAF extension (read by the WebUI before it parses its args).


def preload(parser):
    parser.add_argument(
        "--ostaf-dir",
        type=str,
        default=None,
        help="folder of OSTAF adapters (default: models/ostaf, or the OSTAF setting)",
    )
