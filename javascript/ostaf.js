// OSTAF tab: start the WebUI's own progress bar + live preview for a training run.
// Returns the Train button's inputs with the first one replaced by a task id, as the
// WebUI's Train tab does (wrap_gradio_gpu_call recognises "task(...)").
function ostaf_start_training() {
    var id = randomId();
    var info = gradioApp().getElementById('ostaf_textinfo');
    requestProgress(id, gradioApp().getElementById('ostaf_log'), gradioApp().getElementById('ostaf_gallery'), function() {}, function(progress) {
        if (info) info.innerHTML = progress.textinfo || '';
    });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

// The same for the Object implantation sub-tab (its own log, gallery and text box).
function ostaf_start_implant() {
    var id = randomId();
    var info = gradioApp().getElementById('ostaf_obj_textinfo');
    requestProgress(id, gradioApp().getElementById('ostaf_obj_log'), gradioApp().getElementById('ostaf_obj_gallery'), function() {}, function(progress) {
        if (info) info.innerHTML = progress.textinfo || '';
    });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}
