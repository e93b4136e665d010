// Bad input across the engine ABI: nulls, a missing and a corrupt bundle, bad requests (a Python
// exception inside), unknown ids, wrong buffer sizes, double destroy. Status and message, no crash.
//   engine_bad_input BUNDLE_DIR SCRATCH_DIR
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "sencache.h"

static int failures = 0;

#define EXPECT(status_expr, want)                                                                   \
    do {                                                                                           \
        const sc_status got_ = (status_expr);                                                      \
        if (got_ != (want)) {                                                                      \
            std::printf("FAIL line %d: %s -> %s (want %s): %s\n", __LINE__, #status_expr,          \
                        sc_status_name(got_), sc_status_name(want), sc_last_error());              \
            ++failures;                                                                            \
        } else if (got_ != SC_OK) {                                                                \
            std::printf("ok   line %d: %s: %s\n", __LINE__, sc_status_name(got_), sc_last_error()); \
            if (!*sc_last_error()) ++failures;                                                     \
        }                                                                                          \
    } while (0)

// The message names the field of the C struct that holds the bad value, not a Python or CLI name.
#define EXPECT_NAMES(prefix)                                                                       \
    do {                                                                                           \
        if (std::strncmp(sc_last_error(), prefix, std::strlen(prefix)) != 0) {                     \
            std::printf("FAIL line %d: message %s does not begin with %s\n", __LINE__,             \
                        sc_last_error(), prefix);                                                  \
            ++failures;                                                                            \
        }                                                                                          \
    } while (0)

int main(int argc, char** argv) {
    if (argc < 3) return 2;
    const std::string bundle = argv[1], scratch = std::string(argv[2]) + "/engine_bad_input.scratch";
    std::system(("rm -rf '" + scratch + "' && mkdir -p '" + scratch + "/corrupt' '" + scratch + "/not_a_bundle'").c_str());
    sc_engine* engine = nullptr;
    sc_engine_options options{"auto", "cpu", 1};
    EXPECT(sc_engine_create(nullptr, &options, &engine), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_create(bundle.c_str(), &options, nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_create((scratch + "/missing").c_str(), &options, &engine), SC_ERR_NOT_FOUND);
    std::ofstream(scratch + "/not_a_bundle/notes.txt") << "a folder of other files, like /etc";
    EXPECT(sc_engine_create((scratch + "/not_a_bundle").c_str(), &options, &engine), SC_ERR_NOT_FOUND);
    std::ofstream(scratch + "/corrupt/manifest.json") << "{not json";
    EXPECT(sc_engine_create((scratch + "/corrupt").c_str(), &options, &engine), SC_ERR_CORRUPT);
    sc_engine_options bad_backend{"no-such-backend", "cpu", 1};
    EXPECT(sc_engine_create(bundle.c_str(), &bad_backend, &engine), SC_ERR_INVALID_ARGUMENT);
    sc_engine_options negative{"auto", "cpu", -1};
    EXPECT(sc_engine_create(bundle.c_str(), &negative, &engine), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_create(bundle.c_str(), nullptr, &engine), SC_OK);  // NULL options: the defaults

    // nulls and unknown ids
    int64_t id = 0;
    sc_progress p;
    sc_request request{};
    request.prompt = "one small red circle static on black";
    request.steps = 3;
    request.guidance = -1;
    EXPECT(sc_engine_submit(nullptr, &request, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_submit(engine, nullptr, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_submit(engine, &request, nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_step(nullptr, nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_poll(engine, 12345, &p), SC_ERR_UNKNOWN_ID);
    EXPECT(sc_engine_poll(engine, 1, nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_cancel(engine, 12345, nullptr), SC_ERR_UNKNOWN_ID);
    EXPECT(sc_engine_release(engine, 12345), SC_ERR_UNKNOWN_ID);
    int64_t shape[4];
    EXPECT(sc_engine_frames_shape(engine, 12345, shape), SC_ERR_UNKNOWN_ID);

    // bad requests: refused by the runtime's checks (Python exceptions inside, mapped to statuses)
    sc_request bad = request;
    bad.prompt = nullptr;
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    bad = request;
    bad.steps = 5000;
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT_NAMES("request->steps must be in [1, 1000]");
    bad = request;
    bad.cache = "no-such-cache";
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT_NAMES("request->cache must be one of");
    bad = request;
    bad.knobs_json = "{\"eps_main\": -1}";
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT_NAMES("request->knobs_json eps_main must be");
    bad.knobs_json = "{\"velocity\": 2}";
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT_NAMES("request->knobs_json has an unknown cache knob 'velocity'");
    bad.knobs_json = "{not json";
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    bad.knobs_json = "[1, 2]";
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    bad = request;
    bad.prompt = "one small purple circle static on black";  // outside the tiny model's words
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT_NAMES("request->prompt ");
    bad = request;
    bad.prompt = "\xff\xfe not UTF-8";  // a Python exception inside the call (UnicodeDecodeError)
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_PYTHON);
    bad = request;
    bad.seed = ~uint64_t{0};
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    std::vector<float> embeds(4 * 3, 0.5f);
    bad = request;
    bad.prompt_embeds = embeds.data();
    bad.embed_tokens = 0;
    bad.embed_channels = 3;
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_BUFFER_SIZE);
    bad.embed_tokens = 4;  // channels that do not fit the model: refused before queueing
    EXPECT(sc_engine_submit(engine, &bad, &id), SC_ERR_INVALID_ARGUMENT);
    EXPECT_NAMES("request->prompt_embeds has shape [4, 3]");

    // a good request: frames before the end, wrong buffer sizes, cancel after the end
    EXPECT(sc_engine_submit(engine, &request, &id), SC_OK);
    EXPECT(sc_engine_frames_shape(engine, id, shape), SC_ERR_STATE);
    EXPECT(sc_engine_release(engine, id), SC_ERR_STATE);
    // another thread polls and submits while this one steps: the GIL is taken inside each call
    std::atomic<bool> stepping{true};
    std::atomic<int> polls{0}, poll_failures{0};
    int64_t from_thread = 0;
    std::thread poller([&] {
        sc_progress q;
        sc_request r = request;
        if (sc_engine_submit(engine, &r, &from_thread) != SC_OK) ++poll_failures;
        while (stepping) {
            if (sc_engine_poll(engine, id, &q) != SC_OK) ++poll_failures;
            ++polls;
        }
    });
    int32_t active = 1;
    while (active > 0 || polls == 0) EXPECT(sc_engine_step(engine, &active), SC_OK);
    stepping = false;
    poller.join();
    while (active > 0) EXPECT(sc_engine_step(engine, &active), SC_OK);
    std::printf("ok   %d polls from another thread while stepping, %d failed\n", polls.load(), poll_failures.load());
    if (poll_failures) ++failures;
    EXPECT(sc_engine_frames_shape(engine, id, nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_engine_frames_shape(engine, id, shape), SC_OK);
    std::vector<float> small(10);
    EXPECT(sc_engine_copy_frames(engine, id, small.data(), small.size()), SC_ERR_BUFFER_SIZE);
    EXPECT(sc_engine_copy_frames(engine, id, nullptr, 0), SC_ERR_INVALID_ARGUMENT);
    int cancelled = 1;
    EXPECT(sc_engine_cancel(engine, id, &cancelled), SC_OK);
    if (cancelled != 0) ++failures;
    // cancel a queued request
    int64_t second = 0;
    EXPECT(sc_engine_submit(engine, &request, &second), SC_OK);
    EXPECT(sc_engine_cancel(engine, second, &cancelled), SC_OK);
    EXPECT(sc_engine_poll(engine, second, &p), SC_OK);
    if (cancelled != 1 || p.state != SC_CANCELLED) ++failures;
    EXPECT(sc_engine_release(engine, id), SC_OK);
    EXPECT(sc_engine_poll(engine, id, &p), SC_ERR_UNKNOWN_ID);

    sc_engine_destroy(engine);
    sc_engine_destroy(engine);  // double destroy: a no-op
    sc_engine_destroy(nullptr);
    std::printf("%s: %d failures\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
