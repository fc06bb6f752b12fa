import sys

from lib_ostaf.cli import main

sys.exit(main())
