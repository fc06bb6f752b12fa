// OSTAF tab: start the WebUI's own progress bar + live preview for a training run.
// Returns the Train button's inputs with the first one replaced by a task id, as the
// WebUI's Train tab does (wrap_gradio_gpu_call recognises "task(...)").
function ostaf_start_training() {
    return ostaf_start('ostaf_textinfo', 'ostaf_log', 'ostaf_gallery', arguments);
}

// The same for the Object implantation sub-tab (its own log, gallery and text box).
function ostaf_start_implant() {
    return ostaf_start('ostaf_obj_textinfo', 'ostaf_obj_log', 'ostaf_obj_gallery', arguments);
}

function ostaf_start(infoId, logId, galleryId, args) {
    var id = randomId();
    var info = gradioApp().getElementById(infoId);
    var atEnd = function() {
        if (info) info.innerHTML = '';  // the last poll's text ("image 0/2") would stay
        ostaf_refresh_cards();
    };
    requestProgress(id, gradioApp().getElementById(logId), gradioApp().getElementById(galleryId), atEnd, function(progress) {
        if (info) info.innerHTML = progress.textinfo || '';
    });
    var res = Array.from(args);
    res[0] = id;
    return res;
}

// After a run: rebuild the OSTAF Extra Networks page (txt2img and img2img), as its Refresh
// button does, so a new adapter appears and a retrained one shows its new preview (the
// card's preview URL carries the file's mtime, which the page reads only when it is rebuilt).
function ostaf_refresh_cards() {
    ['txt2img', 'img2img'].forEach(function(tab) {
        var button = gradioApp().getElementById(tab + '_ostaf_extra_refresh_internal');
        if (button) button.click();
    });
}
