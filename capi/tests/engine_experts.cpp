// The second expert's guidance across the engine ABI: sc_engine_submit_ex with sc_request_extra on a
// two-expert bundle (tiny-wan2.2), its frames written for check_engine_experts.py to compare with
// the Python API; a caller built against an older sc_request_extra (a smaller size) gets the
// defaults, as sc_engine_submit does; bad sizes and guidance_2 on a one-expert bundle are refused.
//   engine_experts TWO_EXPERT_BUNDLE ONE_EXPERT_BUNDLE FRAMES_OUT
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <vector>

#include "sencache.h"

static int failures = 0;

static void expect(sc_status got, sc_status want, const char* needle, int line) {
    if (got != want || (needle && !std::strstr(sc_last_error(), needle))) {
        std::printf("FAIL line %d: %s (want %s): %s\n", line, sc_status_name(got), sc_status_name(want), sc_last_error());
        ++failures;
    } else if (got != SC_OK) {
        std::printf("ok   line %d: %s: %s\n", line, sc_status_name(got), sc_last_error());
    }
}
#define EXPECT(expr, want, needle) expect((expr), (want), (needle), __LINE__)

// One request alone, run to the end (as Engine.generate runs it: the same batch, so the same bits):
// its frames, empty where it was refused. extra NULL: through sc_engine_submit.
static std::vector<float> run(sc_engine* engine, const sc_request& request, const sc_request_extra* extra,
                              int64_t shape[4]) {
    int64_t id = 0;
    const sc_status submitted =
        extra ? sc_engine_submit_ex(engine, &request, nullptr, extra, &id) : sc_engine_submit(engine, &request, &id);
    EXPECT(submitted, SC_OK, nullptr);
    if (submitted != SC_OK) return {};
    int32_t active = 1;
    while (active > 0 && failures == 0) EXPECT(sc_engine_step(engine, &active), SC_OK, nullptr);
    EXPECT(sc_engine_frames_shape(engine, id, shape), SC_OK, nullptr);
    std::vector<float> frames(static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]));
    EXPECT(sc_engine_copy_frames(engine, id, frames.data(), frames.size()), SC_OK, nullptr);
    EXPECT(sc_engine_release(engine, id), SC_OK, nullptr);
    return frames;
}

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    std::printf("sc_abi_version %d\n", sc_abi_version());
    if (sc_abi_version() < 2) ++failures;
    sc_request request{};
    request.prompt = "one small red circle moving left fast on black";
    request.seed = 3;
    request.steps = 6;
    request.guidance = 4.0;
    request.cache = "none";
    sc_engine_options options{"auto", "cpu", 1};

    sc_engine* engine = nullptr;
    EXPECT(sc_engine_create(argv[1], &options, &engine), SC_OK, nullptr);
    if (!engine) return 1;
    int64_t id = 0;
    sc_request_extra extra{};
    extra.guidance_2 = 2.0;
    EXPECT(sc_engine_submit_ex(engine, &request, nullptr, &extra, &id), SC_ERR_INVALID_ARGUMENT, "extra->size");
    extra.size = sizeof(sc_request_extra) + 8;
    EXPECT(sc_engine_submit_ex(engine, &request, nullptr, &extra, &id), SC_ERR_UNSUPPORTED, "extra->size");
    int64_t shape[4] = {0, 0, 0, 0};
    const std::vector<float> base = run(engine, request, nullptr, shape);
    extra.size = sizeof(sc_request_extra);
    extra.guidance_2 = -2.0;  // unset: guidance for both experts, as with no extra
    if (run(engine, request, &extra, shape) != base) {
        std::printf("FAIL: guidance_2 < 0 differs from sc_engine_submit\n");
        ++failures;
    }
    extra.guidance_2 = 2.0;
    extra.size = offsetof(sc_request_extra, guidance_2);  // a header without guidance_2: not read
    if (run(engine, request, &extra, shape) != base) {
        std::printf("FAIL: a size short of guidance_2 differs from sc_engine_submit\n");
        ++failures;
    }
    extra.size = sizeof(sc_request_extra);
    const std::vector<float> guided = run(engine, request, &extra, shape);
    if (FILE* out = std::fopen(argv[3], "wb")) {
        std::fwrite(shape, sizeof(int64_t), 4, out);
        std::fwrite(base.data(), sizeof(float), base.size(), out);
        std::fwrite(guided.data(), sizeof(float), guided.size(), out);
        std::fclose(out);
    } else {
        ++failures;
    }
    sc_engine_destroy(engine);

    sc_engine* one = nullptr;
    EXPECT(sc_engine_create(argv[2], &options, &one), SC_OK, nullptr);
    if (one) {
        request.prompt = "one small red circle static on black";
        EXPECT(sc_engine_submit_ex(one, &request, nullptr, &extra, &id), SC_ERR_INVALID_ARGUMENT,
               "extra->guidance_2 is the second expert's guidance; tiny-wan has one expert");
        extra.guidance_2 = -1.0;
        EXPECT(sc_engine_submit_ex(one, &request, nullptr, &extra, &id), SC_OK, nullptr);
        sc_engine_destroy(one);
    }
    std::printf("%s\n", failures ? "FAILED" : "all expert checks passed");
    return failures ? 1 : 0;
}
