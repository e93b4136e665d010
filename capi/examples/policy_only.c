/* The cache alone, in C: a bundle's sensitivity table and default settings, one policy per
 * request, and per step: drift in, run mask out. Your denoiser runs the blocks where the mask is 1
 * and reuses its cached residual where it is 0. Here the drift is made up (your drift kernel,
 * e.g. sc_drift_launch/sc_drift_wait, gives the real one), so the decisions are only illustrative.
 * The same request then goes through the online rule, which also learns from the reuse errors the
 * host observes (made up here too).
 *   policy_only BUNDLE_DIR
 */
#include <math.h>
#include <stdio.h>

#include "sencache.h"

#define STEPS 30
#define BATCH 2

static const int64_t numel = 16 * 32 * 32 * 3; /* latent elements per sample */

/* One request of STEPS steps through `policy`; nfe[b] counts the steps sample b runs. The online
 * rule is told, after each decision, what reusing would have cost the samples that ran. */
static int denoise(sc_policy* policy, int learns, int nfe[BATCH]) {
    for (int step = 0; step < STEPS; ++step) {
        const double t = 1000.0 * (1.0 - (double)step / STEPS);
        float drift_sumsq[BATCH];
        double error_sumsq[BATCH];
        uint8_t run[BATCH];
        for (int b = 0; b < BATCH; ++b) drift_sumsq[b] = (float)(numel * 1e-4 * (1 + b) * (1 + step % 3));
        if (sc_policy_decide(policy, step, t, drift_sumsq, run, BATCH) != SC_OK) return 1;
        for (int b = 0; b < BATCH; ++b) {
            nfe[b] += run[b]; /* run the blocks for these samples only */
            /* reusing costs sample 0 less than the table predicts and sample 1 more: their factors
               move apart, the one reuses more, the other runs more */
            error_sumsq[b] = run[b] && step > 0 ? numel * (b ? 1e-2 : 1e-6) : NAN;
        }
        if (learns && sc_policy_observe(policy, step, error_sumsq, BATCH) != SC_OK) return 1;
    }
    return 0;
}

int main(int argc, char** argv) {
    sc_table* table = NULL;
    sc_policy_settings settings;
    sc_policy_extra extra = SC_POLICY_EXTRA_DEFAULTS; /* the online rule's knobs, at their defaults */
    sc_policy *policy = NULL, *online = NULL;
    int nfe[BATCH] = {0, 0}, online_nfe[BATCH] = {0, 0};
    double factor[BATCH];
    if (argc < 2) return 2;
    if (sc_table_load_bundle(argv[1], &table) != SC_OK || sc_policy_settings_from_bundle(argv[1], &settings) != SC_OK ||
        sc_policy_create(table, &settings, STEPS, BATCH, numel, &policy) != SC_OK) {
        fprintf(stderr, "sencache: %s\n", sc_last_error());
        sc_table_destroy(table);
        return 1;
    }
    settings.rule = SC_RULE_SENCACHE_ONLINE;
    extra.online_prior = 2.0;
    if (sc_policy_create_ex(table, &settings, &extra, STEPS, BATCH, numel, &online) != SC_OK ||
        denoise(policy, 0, nfe) != 0 || denoise(online, 1, online_nfe) != 0 ||
        sc_policy_factor(online, factor, BATCH) != SC_OK) {
        fprintf(stderr, "sencache: %s\n", sc_last_error());
        sc_table_destroy(table);
        sc_policy_destroy(policy);
        sc_policy_destroy(online);
        return 1;
    }
    sc_table_destroy(table); /* each policy keeps its own reference */
    printf("sencache: NFE %d and %d of %d steps\n", nfe[0], nfe[1], STEPS);
    printf("sencache-online: NFE %d and %d, learnt factors %.3g and %.3g\n", online_nfe[0], online_nfe[1], factor[0],
           factor[1]);
    sc_policy_destroy(policy);
    sc_policy_destroy(online);
    return 0;
}
