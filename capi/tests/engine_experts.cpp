// The second expert's guidance across the engine ABI: sc_engine_submit_ex with sc_request_extra on a
// two-expert bundle (tiny-wan2.2), its frames written for check_engine_experts.py to compare with
// the Python API; a caller built against an older sc_request_extra (a smaller size) gets the
// defaults, as sc_engine_submit does; bad sizes and guidance_2 on a one-expert bundle are refused.
//   engine_experts TWO_EXPERT_BUNDLE ONE_EXPERT_BUNDLE FRAMES_OUT
#include <cstddef>
#include <cstdio>
#include <vector>

#include "engine_checks.h"

// One request alone, run to the end (as Engine.generate runs it: the same batch, so the same bits):
// its frames, empty where it was refused. extra NULL: through sc_engine_submit.
static std::vector<float> run(sc_engine* engine, const sc_request& request, const sc_request_extra* extra,
                              int64_t shape[4]) {
    int64_t id = 0;
    const sc_status submitted =
        extra ? sc_engine_submit_ex(engine, &request, nullptr, extra, &id) : sc_engine_submit(engine, &request, &id);
    EXPECT(submitted, SC_OK, nullptr);
    if (submitted != SC_OK) return {};
    std::vector<float> frames = run_to_end(engine, id, shape);
    EXPECT(sc_engine_release(engine, id), SC_OK, nullptr);
    return frames;
}

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    std::printf("sc_abi_version %d\n", sc_abi_version());
    if (sc_abi_version() < 2) ++failures;
    sc_request request = tiny_request("one small red circle moving left fast on black", 6, 4.0);

    sc_engine* engine = open_engine(argv[1]);
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
    write_frames(argv[3], shape, {&base, &guided});
    sc_engine_destroy(engine);

    if (sc_engine* one = open_engine(argv[2])) {
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
