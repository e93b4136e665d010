/* The cache alone, in C: a bundle's sensitivity table and default settings, one policy per
 * request, and per step: drift in, run mask out. Your denoiser runs the blocks where the mask is 1
 * and reuses its cached residual where it is 0. Here the drift is made up (your drift kernel,
 * e.g. sc_drift_launch/sc_drift_wait, gives the real one), so the decisions are only illustrative.
 *   policy_only BUNDLE_DIR
 */
#include <math.h>
#include <stdio.h>

#include "sencache.h"

#define STEPS 30
#define BATCH 2

int main(int argc, char** argv) {
    sc_table* table = NULL;
    sc_policy_settings settings;
    sc_policy* policy = NULL;
    const int64_t numel = 16 * 32 * 32 * 3; /* latent elements per sample */
    if (argc < 2) return 2;
    if (sc_table_load_bundle(argv[1], &table) != SC_OK || sc_policy_settings_from_bundle(argv[1], &settings) != SC_OK ||
        sc_policy_create(table, &settings, STEPS, BATCH, numel, &policy) != SC_OK) {
        fprintf(stderr, "sencache: %s\n", sc_last_error());
        sc_table_destroy(table);
        return 1;
    }
    sc_table_destroy(table); /* the policy keeps its own reference */
    int nfe[BATCH] = {0, 0};
    for (int step = 0; step < STEPS; ++step) {
        const double t = 1000.0 * (1.0 - (double)step / STEPS);
        float drift_sumsq[BATCH];
        uint8_t run[BATCH];
        for (int b = 0; b < BATCH; ++b) drift_sumsq[b] = (float)(numel * 1e-4 * (1 + b) * (1 + step % 3));
        if (sc_policy_decide(policy, step, t, drift_sumsq, run, BATCH) != SC_OK) {
            fprintf(stderr, "sencache: %s\n", sc_last_error());
            sc_policy_destroy(policy);
            return 1;
        }
        for (int b = 0; b < BATCH; ++b) nfe[b] += run[b]; /* run the blocks for these samples only */
    }
    printf("NFE %d and %d of %d steps\n", nfe[0], nfe[1], STEPS);
    sc_policy_destroy(policy);
    return 0;
}
