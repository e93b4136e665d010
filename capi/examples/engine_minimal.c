/* The whole engine, in C: load a bundle, submit one request, step it to the end, read its frames.
 *   engine_minimal BUNDLE_DIR
 */
#include <stdio.h>
#include <stdlib.h>

#include "sencache.h"

static void progress(void* user, int64_t id, const sc_progress* p) {
    (void)user;
    printf("request %lld: step %d/%d, NFE %d\n", (long long)id, p->step, p->steps, p->nfe);
}

int main(int argc, char** argv) {
    sc_engine_options options = {"auto", "cpu", 0};
    sc_engine* engine = NULL;
    sc_request request = {0};
    int64_t id = 0, shape[4];
    int32_t active = 1;
    if (argc < 2) return 2;
    if (sc_engine_create(argv[1], &options, &engine) != SC_OK) goto fail;
    sc_engine_set_progress(engine, progress, NULL);
    request.prompt = "one small red circle static on black";
    request.seed = 1;
    request.steps = 6;
    request.guidance = -1; /* the bundle's default */
    request.cache = "sencache";
    request.knobs_json = "{\"max_reuse\": 2}";
    if (sc_engine_submit(engine, &request, &id) != SC_OK) goto fail;
    while (active > 0)
        if (sc_engine_step(engine, &active) != SC_OK) goto fail;
    if (sc_engine_frames_shape(engine, id, shape) != SC_OK) goto fail;
    size_t count = (size_t)(shape[0] * shape[1] * shape[2] * shape[3]);
    float* frames = malloc(count * sizeof(float));
    if (!frames || sc_engine_copy_frames(engine, id, frames, count) != SC_OK) {
        free(frames);
        goto fail;
    }
    printf("frames [%lld, %lld, %lld, %lld], first pixel %.4f\n", (long long)shape[0], (long long)shape[1],
           (long long)shape[2], (long long)shape[3], frames[0]);
    free(frames);
    sc_engine_release(engine, id);
    sc_engine_destroy(engine);
    return 0;
fail:
    fprintf(stderr, "sencache: %s\n", sc_last_error());
    sc_engine_destroy(engine);
    return 1;
}
