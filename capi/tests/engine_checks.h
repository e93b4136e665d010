// What the engine ABI checks share: EXPECT (the status, and a needle its message holds), an engine
// opened on the CPU, the request they submit to the tiny bundles, a submitted request run to its
// end, and the frames file their check_engine_*.py scripts read.
#pragma once

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "sencache.h"

static int failures = 0;

static inline void expect(sc_status got, sc_status want, const char* needle, int line) {
    if (got != want || (needle && !std::strstr(sc_last_error(), needle))) {
        std::printf("FAIL line %d: %s (want %s): %s\n", line, sc_status_name(got), sc_status_name(want), sc_last_error());
        ++failures;
    } else if (got != SC_OK) {
        std::printf("ok   line %d: %s: %s\n", line, sc_status_name(got), sc_last_error());
    }
}
#define EXPECT(expr, want, needle) expect((expr), (want), (needle), __LINE__)

// The engine of `bundle` on the CPU with one thread; nullptr (a failure counted) where it does not open.
static inline sc_engine* open_engine(const char* bundle) {
    const sc_engine_options options{"auto", "cpu", 1};
    sc_engine* engine = nullptr;
    EXPECT(sc_engine_create(bundle, &options, &engine), SC_OK, nullptr);
    return engine;
}

// `prompt` at seed 3, uncached, `steps` steps at `guidance`.
static inline sc_request tiny_request(const char* prompt, int32_t steps, double guidance) {
    sc_request request{};
    request.prompt = prompt;
    request.seed = 3;
    request.steps = steps;
    request.guidance = guidance;
    request.cache = "none";
    return request;
}

// Steps `engine` until nothing is active (or a check failed): the frames of request `id`, their
// shape in `shape`.
static inline std::vector<float> run_to_end(sc_engine* engine, int64_t id, int64_t shape[4]) {
    int32_t active = 1;
    while (active > 0 && failures == 0) EXPECT(sc_engine_step(engine, &active), SC_OK, nullptr);
    EXPECT(sc_engine_frames_shape(engine, id, shape), SC_OK, nullptr);
    std::vector<float> frames(static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]));
    EXPECT(sc_engine_copy_frames(engine, id, frames.data(), frames.size()), SC_OK, nullptr);
    return frames;
}

// The shape (4 x int64), then each run's frames (float32) in turn; a failure where it cannot be written.
static inline void write_frames(const char* path, const int64_t shape[4],
                                std::initializer_list<const std::vector<float>*> runs) {
    FILE* out = std::fopen(path, "wb");
    if (!out) {
        ++failures;
        return;
    }
    std::fwrite(shape, sizeof(int64_t), 4, out);
    for (const std::vector<float>* frames : runs) std::fwrite(frames->data(), sizeof(float), frames->size(), out);
    std::fclose(out);
}
