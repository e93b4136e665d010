// An image-to-video request across the engine ABI: a strided RGB buffer through
// sc_engine_submit_image, run to the end, its frames written for check_engine_image.py to compare
// with the Python API; and the image refusals (missing, on a text-to-video bundle, bad fields).
//   engine_image I2V_BUNDLE T2V_BUNDLE FRAMES_OUT
#include <cstdint>
#include <cstdio>
#include <vector>

#include "engine_checks.h"

// The picture check_engine_image.py rebuilds: 56 x 40 RGB, rows padded to 200 bytes.
constexpr int32_t kWidth = 56, kHeight = 40, kStride = 200;

int main(int argc, char** argv) {
    if (argc < 4) return 2;
    std::vector<uint8_t> pixels(static_cast<size_t>(kStride) * kHeight, 0xEE);  // padding: not pixels
    for (int y = 0; y < kHeight; ++y)
        for (int x = 0; x < kWidth; ++x)
            for (int c = 0; c < 3; ++c) pixels[y * kStride + x * 3 + c] = static_cast<uint8_t>((y * 7 + x * 13 + c * 101) % 256);
    const sc_image image{pixels.data(), kWidth, kHeight, 3, kStride};
    sc_request request = tiny_request("a red circle moving left", 3, 5.0);

    sc_engine* engine = open_engine(argv[1]);
    if (!engine) return 1;
    int64_t id = 0;
    EXPECT(sc_engine_submit(engine, &request, &id), SC_ERR_INVALID_ARGUMENT, "image is missing");
    sc_image bad = image;
    bad.channels = 4;
    EXPECT(sc_engine_submit_image(engine, &request, &bad, &id), SC_ERR_INVALID_ARGUMENT, "image->channels");
    bad = image;
    bad.stride = kWidth * 3 - 1;
    EXPECT(sc_engine_submit_image(engine, &request, &bad, &id), SC_ERR_BUFFER_SIZE, "image->stride");
    bad = image;
    bad.width = 8;
    EXPECT(sc_engine_submit_image(engine, &request, &bad, &id), SC_ERR_INVALID_ARGUMENT, "image->width");
    bad = image;
    bad.pixels = nullptr;
    EXPECT(sc_engine_submit_image(engine, &request, &bad, &id), SC_ERR_INVALID_ARGUMENT, "image->pixels");

    EXPECT(sc_engine_submit_image(engine, &request, &image, &id), SC_OK, nullptr);
    int64_t shape[4] = {0, 0, 0, 0};
    const std::vector<float> frames = run_to_end(engine, id, shape);
    write_frames(argv[3], shape, {&frames});
    sc_engine_destroy(engine);

    if (sc_engine* text_only = open_engine(argv[2])) {
        request.prompt = "one small red circle static on black";
        EXPECT(sc_engine_submit_image(text_only, &request, &image, &id), SC_ERR_INVALID_ARGUMENT,
               "image: tiny-wan is a text-to-video model and takes none");
        sc_engine_destroy(text_only);
    }
    std::printf("%s\n", failures ? "FAILED" : "all image checks passed");
    return failures ? 1 : 0;
}
