// The whole engine from C++: load a bundle, submit a request, step it once, submit a second one
// (it joins at the next step boundary and shares the passes), step both to the end, write frames.
//   engine_two_requests BUNDLE_DIR OUT_DIR [STEPS]
// Writes OUT_DIR/request_<k>.npy (float32 [T, H, W, 3]) and OUT_DIR/request_<k>.nfe.
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "sencache.h"

static int check(sc_status status, const char* what) {
    if (status != SC_OK) std::fprintf(stderr, "%s: %s: %s\n", what, sc_status_name(status), sc_last_error());
    return status;
}

static void on_progress(void* user, int64_t id, const sc_progress* p) {
    (void)user;
    std::printf("request %lld: state %d, step %d/%d, NFE %d\n", static_cast<long long>(id), p->state, p->step,
                p->steps, p->nfe);
}

// A .npy file (version 1.0, little-endian float32, C order).
static void write_npy(const std::string& path, const std::vector<float>& data, const int64_t shape[4]) {
    std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(shape[0]) + ", " +
                         std::to_string(shape[1]) + ", " + std::to_string(shape[2]) + ", " +
                         std::to_string(shape[3]) + "), }";
    header.append(64 - (10 + header.size() + 1) % 64, ' ');
    header += '\n';
    std::ofstream f(path, std::ios::binary);
    const unsigned short len = static_cast<unsigned short>(header.size());
    f.write("\x93NUMPY\x01\x00", 8);
    f.write(reinterpret_cast<const char*>(&len), 2);
    f << header;
    f.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(float)));
}

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s BUNDLE_DIR OUT_DIR [STEPS]\n", argv[0]);
        return 2;
    }
    const std::string out_dir = argv[2];
    const int steps = argc > 3 ? std::atoi(argv[3]) : 0;
    sc_engine_options options{"auto", "cpu", 1};
    sc_engine* engine = nullptr;
    if (check(sc_engine_create(argv[1], &options, &engine), "create")) return 1;
    sc_engine_set_progress(engine, on_progress, nullptr);

    const char* prompts[2] = {"one small red circle static on black",
                              "two small blue squares moving right slow on black"};
    const uint64_t seeds[2] = {1, 2};
    int64_t ids[2] = {0, 0};
    sc_request request{};
    request.steps = steps;
    request.guidance = -1;  // the bundle's default
    request.cache = "sencache";
    for (int k = 0; k < 2; ++k) {
        request.prompt = prompts[k];
        request.seed = seeds[k];
        if (check(sc_engine_submit(engine, &request, &ids[k]), "submit")) return 1;
        if (k == 0 && check(sc_engine_step(engine, nullptr), "step")) return 1;  // the first one starts alone
    }
    int32_t active = 1;
    while (active > 0)
        if (check(sc_engine_step(engine, &active), "step")) return 1;

    for (int k = 0; k < 2; ++k) {
        sc_progress p;
        if (check(sc_engine_poll(engine, ids[k], &p), "poll")) return 1;
        if (p.state != SC_DONE) {
            std::fprintf(stderr, "request %lld ended in state %d\n", static_cast<long long>(ids[k]), p.state);
            return 1;
        }
        int64_t shape[4];
        if (check(sc_engine_frames_shape(engine, ids[k], shape), "frames_shape")) return 1;
        std::vector<float> frames(static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]));
        if (check(sc_engine_copy_frames(engine, ids[k], frames.data(), frames.size()), "copy_frames")) return 1;
        write_npy(out_dir + "/request_" + std::to_string(k) + ".npy", frames, shape);
        std::ofstream(out_dir + "/request_" + std::to_string(k) + ".nfe") << p.nfe << "\n";
        if (check(sc_engine_release(engine, ids[k]), "release")) return 1;
    }
    sc_engine_destroy(engine);
    std::printf("wrote %s/request_0.npy and request_1.npy\n", out_dir.c_str());
    return 0;
}
