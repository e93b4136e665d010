/* sencache.h: the C ABI of the SenCache engine (C++17 inside, plain C outside).
 *
 * Two libraries, one header:
 *   libsencache_policy  the cache alone, native, no Python: sensitivity tables (sc_table_*), the
 *                       SenCache decision rules per request (sc_policy_*: sencache, sencache-max,
 *                       sencache-online; NFE budgets for sencache and sencache-online) and, when
 *                       built with CUDA,
 *                       the fused drift kernel on the caller's stream (sc_drift_*).
 *   libsencache         the whole engine (sc_engine_*): the Python runtime's step-level engine
 *                       (sencache.runtime.stepping.StepEngine) behind an embedded interpreter.
 *
 * Errors: every call returns an sc_status; on anything but SC_OK, sc_last_error() returns a
 * readable message for the failing call on the CALLING thread (thread-local; valid until that
 * thread's next sc_* call). No exception or abort crosses the ABI, nothing is printed.
 * Destroy functions accept NULL, and destroying a handle twice is a no-op (the library keeps the
 * set of live handles); any other use of a destroyed handle is undefined behaviour.
 *
 * Threading:
 *   - sc_table: immutable after loading; any number of threads may use one table at once.
 *   - sc_policy: one request's state; calls on one policy must not overlap (no internal lock).
 *     Different policies may be used from different threads at once.
 *   - sc_engine: every call may be made from any thread, concurrently. Each call takes the
 *     Python GIL for its duration (PyGILState_Ensure/Release), so calls are serialised where they
 *     touch Python; sc_engine_step releases the GIL while the stages run inside torch/ONNX
 *     Runtime as those libraries do, so sc_engine_submit/poll/cancel answer while a step runs.
 *     If the process has no Python interpreter, the first sc_engine_create initialises one (and
 *     the library never finalises it: finalising with torch loaded is unsafe); if the host
 *     already runs Python (the library loaded into a Python process), the running interpreter is
 *     used and never initialised or finalised by this library. A thread calling in while it
 *     holds the GIL is fine (the GIL state is re-entrant).
 *     sc_engine_destroy must not run while another call on the same engine is in progress (join
 *     your threads first); it ends the engine's requests as cancelled.
 *   - The progress callback runs on the thread that called sc_engine_step, with the GIL NOT held;
 *     it may call sc_engine_poll/submit/cancel, but not sc_engine_destroy on the same engine.
 */
#ifndef SENCACHE_H
#define SENCACHE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define SC_API __declspec(dllexport)
#else
#define SC_API __attribute__((visibility("default")))
#endif

/* 2: sc_engine_submit_ex and sc_request_extra (the second expert's guidance).
 * 3: SC_RULE_SENCACHE_ONLINE with sc_policy_create_ex, sc_policy_extra (its knobs),
 *    sc_policy_observe and sc_policy_factor.
 * 4: NFE budgets in the native rule: sc_budget and sc_policy_create_budget (sencache and
 *    sencache-online held to nfe, speedup or a named speed, in threshold or hard mode), tables
 *    carrying the budget curves they were calibrated with, and sc_table_has_budget. The layouts and
 *    behaviour of ABI 1-3 are unchanged.
 * 5: SC_RULE_SENCACHE_PLAN with sc_policy_create_budget (sencache-plan: one schedule of the budget's
 *    runs over the table's reuse costs, every sample following it). ABI 1-4 unchanged.
 * 6: SC_RULE_SENCACHE_PLAN on a table whose reuse costs carry the calibration's mean squared scores
 *    re-plans each sample at every step from its drift, so it takes drift_sumsq on the steps that
 *    are not forced. Tables without them, and ABI 1-5's layouts, are unchanged.
 * 7: SC_RULE_SENCACHE_PLAN on a table whose reuse costs also carry the calibration's mean observed
 *    reuse errors, at their step count, re-plans from the errors the host observes too
 *    (sc_policy_observe, sc_policy_factor). Other tables, and ABI 1-6's layouts, are unchanged. */
#define SC_ABI_VERSION 7

typedef enum sc_status {
    SC_OK = 0,
    SC_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a value out of range */
    SC_ERR_BUFFER_SIZE = 2,      /* a buffer's length does not match what the call needs */
    SC_ERR_NOT_FOUND = 3,        /* a missing file or bundle */
    SC_ERR_CORRUPT = 4,          /* a file that exists but cannot be read as what it should be */
    SC_ERR_UNKNOWN_ID = 5,       /* a request id the engine does not know (or already released) */
    SC_ERR_STATE = 6,            /* the call does not apply now (frames of a running request, ...) */
    SC_ERR_PYTHON = 7,           /* an exception inside the Python runtime (message: its text) */
    SC_ERR_CUDA = 8,             /* a CUDA runtime error */
    SC_ERR_UNSUPPORTED = 9,      /* not built into this library (e.g. sc_drift_* without CUDA) */
    SC_ERR_INTERNAL = 10         /* an unexpected C++ failure (out of memory, ...) */
} sc_status;

/* The message of the last failing sc_* call on this thread ("" if none). */
SC_API const char* sc_last_error(void);
/* The name of a status ("SC_OK", ...), for logs. */
SC_API const char* sc_status_name(sc_status status);
/* SC_ABI_VERSION of the library actually loaded. */
SC_API int sc_abi_version(void);

/* ---- Sensitivity tables (SPEC section 4) ---------------------------------------------------- */

typedef struct sc_table sc_table;

/* A bundle's sensitivity.json (format "sencache-sensitivity/1", as the runtime writes it). */
SC_API sc_status sc_table_load_json(const char* path, sc_table** out);
/* The same format from memory. */
SC_API sc_status sc_table_parse_json(const char* data, size_t size, sc_table** out);
/* The authors' .npz (keys timesteps, J_x_norm, J_t_norm [, sample_counts]; stored or deflated). */
SC_API sc_status sc_table_load_npz(const char* path, sc_table** out);
/* <bundle_dir>/sensitivity.json. */
SC_API sc_status sc_table_load_bundle(const char* bundle_dir, sc_table** out);
/* ABI 4: 1 if the table carries NFE-budget curves (a bundle calibrated with them; never an .npz),
 * 2 if also sencache-online's measured curve, 0 if none (or NULL). */
SC_API int sc_table_has_budget(const sc_table* table);
/* Number of timesteps (0 for NULL). */
SC_API size_t sc_table_size(const sc_table* table);
/* Jx(t), Jt(t) by linear interpolation (numpy.interp, bit for bit); outside the table it clamps
 * and *inside is 0. Any of jx, jt, inside may be NULL. */
SC_API sc_status sc_table_lookup(const sc_table* table, double t, double* jx, double* jt, int* inside);
SC_API void sc_table_destroy(sc_table* table);

/* ---- The SenCache rule, per request (SPEC sections 1 and 3) --------------------------------- */
/* The engine's conventions (conventions="engine" in Python): interpolated look-ups, the score
 * normalised by sqrt(numel). The authors' reference conventions are not in the native rule yet. */

/* SC_RULE_SENCACHE: Python's "sencache" (SenCachePolicy); SC_RULE_SENCACHE_MAX: "sencache-max"
 * (the larger of the anchor's and the current sensitivities); SC_RULE_SENCACHE_ONLINE (ABI 3):
 * "sencache-online" (SenCacheOnlinePolicy), each sample's score the table's times a factor c_b
 * learnt from the reuse errors the host observes and feeds back (sc_policy_observe); its knobs are
 * in sc_policy_extra (sc_policy_create takes their defaults). */
typedef enum sc_rule {
    SC_RULE_SENCACHE = 0,
    SC_RULE_SENCACHE_MAX = 1,
    SC_RULE_SENCACHE_ONLINE = 2,
    SC_RULE_SENCACHE_PLAN = 3 /* ABI 5: sc_policy_create_budget only */
} sc_rule;

typedef struct sc_policy_settings {
    sc_rule rule;
    double eps_start;   /* threshold of steps i < round(switch_frac * steps); finite, >= 0 */
    double eps_main;    /* threshold after that; finite, >= 0 */
    int32_t max_reuse;  /* most reuses in a row, [0, 1000] */
    double switch_frac; /* [0, 1]; 0.2 in the paper */
    int32_t force_last; /* nonzero: the last step always runs */
} sc_policy_settings;

/* rule SENCACHE, switch_frac 0.2, force_last 1, eps_start/eps_main/max_reuse from the bundle's
 * manifest.json defaults.sencache (the runtime's defaults for that bundle). */
SC_API sc_status sc_policy_settings_from_bundle(const char* bundle_dir, sc_policy_settings* out);

/* Settings beyond sc_policy_settings, which keeps its layout (ABI 3). `size` is
 * sizeof(sc_policy_extra) as the caller was compiled: fields past it take their defaults, so a
 * caller built against an older header keeps working when fields are added; a size larger than
 * this library knows is refused (SC_ERR_UNSUPPORTED) rather than its fields ignored. Start from
 * SC_POLICY_EXTRA_DEFAULTS (size and every default), then change what you need. The fields are
 * checked whatever the rule (a value out of range: SC_ERR_INVALID_ARGUMENT, naming the field, as
 * Python's SenCacheOnlineSettings refuses it); the online knobs act on SC_RULE_SENCACHE_ONLINE only. */
typedef struct sc_policy_extra {
    size_t size;
    double online_rate;  /* [0, 1], default 0.5: weight of the newest observation in each sample's
                          * moving average of log(observed / predicted error) (0: never learn, the
                          * decisions are SC_RULE_SENCACHE's; 1: the last observation alone) */
    double online_bound; /* [1, 1e6], default 4: each observation's ratio, so the factor, stays
                          * within [1 / online_bound, online_bound] */
    double online_prior; /* [0, 1e6], default 0: observations at which the learnt factor gets half
                          * its weight (log c_b x n / (n + prior) after n observations; 0: full
                          * weight from the first) */
} sc_policy_extra;
#define SC_POLICY_EXTRA_DEFAULTS {sizeof(sc_policy_extra), 0.5, 4.0, 0.0}

typedef struct sc_policy sc_policy;

/* A rule for one request of `batch` samples, `steps` steps, latents of `numel` elements per
 * sample. The policy keeps its own reference to the table (the caller may destroy it).
 * sc_policy_create is sc_policy_create_ex with extra NULL (every default). */
SC_API sc_status sc_policy_create(const sc_table* table, const sc_policy_settings* settings, int32_t steps,
                                  int32_t batch, int64_t numel, sc_policy** out);
/* sc_policy_create with further settings (`extra` may be NULL: all their defaults). */
SC_API sc_status sc_policy_create_ex(const sc_table* table, const sc_policy_settings* settings,
                                     const sc_policy_extra* extra, int32_t steps, int32_t batch, int64_t numel,
                                     sc_policy** out);
/* ---- NFE budgets (ABI 4): Python's nfe / speedup / speed knobs with budget threshold or hard ----- */

typedef enum sc_budget_kind {
    SC_BUDGET_NFE = 0,     /* value: runs per sample, an integer in [1, 1000] (Python's nfe) */
    SC_BUDGET_SPEEDUP = 1, /* value: steps / NFE, a number in [1, 1000] (Python's speedup) */
    SC_BUDGET_SPEED = 2    /* speed: a named fraction of the steps (Python's speed) */
} sc_budget_kind;
typedef enum sc_budget_speed {
    SC_SPEED_LOSSLESS = 0, /* 0.9 of the steps */
    SC_SPEED_HIGH = 1,     /* 0.75 */
    SC_SPEED_BALANCED = 2, /* 0.6 */
    SC_SPEED_FAST = 3      /* 0.45 */
} sc_budget_speed;
typedef enum sc_budget_mode {
    SC_BUDGET_THRESHOLD = 0, /* NFE on average: sencache at the eps its calibrated curve gives; sencache-online
                              * at the eps its measured curve gives, or (a table without that curve) the
                              * plan below with max_reuse still applying */
    SC_BUDGET_HARD = 1       /* every sample runs exactly the budget: the per-request plan over the
                              * calibrated score profile (Python's SenCacheHardBudget, SenCacheOnlineBudget) */
} sc_budget_mode;

/* A budget, size-prefixed like sc_policy_extra: `size` is sizeof(sc_budget) as the caller was
 * compiled. Every field below is needed (a smaller size: SC_ERR_INVALID_ARGUMENT); fields a later
 * header adds past them will take their defaults, and a size larger than this library knows is
 * SC_ERR_UNSUPPORTED. Fields out of range are SC_ERR_INVALID_ARGUMENT, the message naming them
 * (budget->value: nfe must be an integer in [1, 1000], got 0). Runs per sample: value (NFE), round(steps x
 * (1 / value)) (SPEEDUP) or round(steps x fraction) (SPEED), half to even as Python's round. */
typedef struct sc_budget {
    size_t size;
    sc_budget_kind kind;
    sc_budget_mode mode;
    double value;          /* NFE and SPEEDUP */
    sc_budget_speed speed; /* SPEED */
} sc_budget;

/* The rule `rule` (SC_RULE_SENCACHE, SC_RULE_SENCACHE_ONLINE or SC_RULE_SENCACHE_PLAN; SC_RULE_SENCACHE_MAX takes no
 * budget, as in Python) for a request held to `budget`, built as Python's make_budget_policy and
 * make_online_budget_policy build it from the table's budget curves (their eps_ratio, max_reuse,
 * switch_frac and force_last: a budget chooses the thresholds), decision for decision:
 *   - threshold modes that resolve an eps behave as sc_policy_create_ex with the settings they
 *     resolved (sc_policy_last: the scores, the threshold eps_start or eps_main, forced);
 *   - the plan (hard modes; sencache-online's threshold mode on a table without its online curve)
 *     reports NaN as the threshold (Python's StepDecision.threshold), the scores as compared with
 *     the plan (sencache-online's: c_b x its step weight x the table's score).
 * `extra` gives sencache-online's knobs; here NULL means none given, as a request without them:
 * the plan learns with online_rate 0.5, online_bound 4, online_prior 2 (Python's BUDGET_PRIOR),
 * and the threshold mode with the knobs its curve was measured with. A non-NULL `extra` gives each
 * field its size covers (checked as in sc_policy_create_ex; SC_RULE_SENCACHE ignores them); in
 * the online threshold mode a given knob other than the curve's is refused. steps <= 1000.
 * Refusals (SC_ERR_INVALID_ARGUMENT, worded as Python's BadInput): a budget field out of range, a
 * table without budget curves ("the sensitivity table has no NFE-budget curves: recalibrate..."),
 * runs outside [forced steps, steps], a threshold budget outside the curve ("... ask for budget
 * hard"). sc_policy_observe and sc_policy_factor apply to SC_RULE_SENCACHE_ONLINE's budgets as to
 * the rule itself. sc_policy_reset restarts the request with the same budget.
 * SC_RULE_SENCACHE_PLAN (ABI 5): Python's make_plan_policy, in either mode: the schedule of exactly
 * the budget's runs that minimises the table's reuse costs (read at `steps` steps), the forced steps
 * run and at most the calibrated max_reuse steps reused in a row; every sample follows it, so
 * drift_sumsq may be NULL, the scores and threshold are NaN and `extra` is ignored. Since ABI 6, on a
 * table whose costs also carry the calibration's mean squared scores, each sample re-plans at every
 * step that is not forced from its own drift (Python's LivePlan, runs_now): drift_sumsq is needed
 * there (the deterministic drift on a sampler that injects noise, as for SC_RULE_SENCACHE_ONLINE),
 * each score is the factor on its anchor's costs, and every sample still runs exactly the budget.
 * Since ABI 7, where the costs also carry the calibration's mean observed reuse errors and `steps` is
 * their step count (Python's ObservingPlanPolicy), that factor is also multiplied by the square of
 * a factor learnt from the reuse errors the host feeds back (sc_policy_observe, sc_policy_factor, as
 * for SC_RULE_SENCACHE_ONLINE, rate 0.5, bound 4, prior 4), each against the calibration's mean
 * error of the same anchor and reuses.
 * Refused: a table without reuse costs ("cache sencache-plan: ... recalibrate it"), a budget no
 * such schedule meets. */
SC_API sc_status sc_policy_create_budget(const sc_table* table, sc_rule rule, const sc_policy_extra* extra,
                                         const sc_budget* budget, int32_t steps, int32_t batch, int64_t numel,
                                         sc_policy** out);
/* ABI 4: the eps a threshold-mode budget resolved (its eps_start, eps_main; NaN for a plan) and the
 * runs per sample it asked for (rounded as above: exactly what each sample runs under a hard
 * budget, the mean aimed at otherwise). Any output may be NULL; a policy made without a budget
 * gives SC_ERR_INVALID_ARGUMENT. */
SC_API sc_status sc_policy_budget(const sc_policy* policy, double* eps_start, double* eps_main, int32_t* nfe);

/* Decide step `step` (0-based, < steps) at timestep `t`: run_mask_out[b] = 1 where sample b runs
 * the blocks, 0 where it reuses its cached residual; then update the per-sample state.
 * drift_sumsq[b] = sum over sample b of (x - anchor)^2 (what sc_drift_* yields); it may be NULL on
 * forced steps (step 0, and the last when force_last). `batch` is the length of both arrays and
 * must equal the policy's. Same arithmetic as the Python rule, in double. */
SC_API sc_status sc_policy_decide(sc_policy* policy, int32_t step, double t, const float* drift_sumsq,
                                  uint8_t* run_mask_out, int32_t batch);
/* The scores of the last decision (NaN where the step was forced), its threshold and whether it
 * was forced; any output may be NULL. SC_RULE_SENCACHE_ONLINE's score is the corrected one, the
 * one compared with the threshold: c_b x (the table's score). */
SC_API sc_status sc_policy_last(const sc_policy* policy, double* scores_out, int32_t batch, double* threshold,
                                int* forced);
/* SC_RULE_SENCACHE_ONLINE: learn from the reuse errors observed at `step`, the step just decided
 * (else SC_ERR_STATE, as after sc_policy_reset). error_sumsq[b] = the squared L2 norm, over sample
 * b, of the guided output from its cached residual minus the fresh guided output (what reusing
 * would have cost it: run the cached residual through the tail too where the sample ran after an
 * earlier run), NaN where not observed (the sample did not run, or had no cached residual yet).
 * Per sample with a finite error and a positive finite prediction (the table's score at that
 * step; none on forced steps): log c_b <- (1 - online_rate) log c_b + online_rate x
 * clip(log(error / prediction), +-log online_bound), both in the score's units (sqrt of the sum
 * over sqrt(numel)); an error of 0 meets the lower bound; others are left as they are (NaN, inf
 * or negative errors: not observed). Observing a step twice learns twice. Python's SenCacheOnlinePolicy.observe, the same arithmetic in double
 * (exp and log: the C library's, as the Python rule calls them). Also an observing sencache-plan
 * (ABI 7, sc_policy_create_budget). Other rules: SC_ERR_INVALID_ARGUMENT. */
SC_API sc_status sc_policy_observe(sc_policy* policy, int32_t step, const double* error_sumsq, int32_t batch);
/* SC_RULE_SENCACHE_ONLINE: each sample's factor c_b as the next decision applies it (1 before any
 * observation): exp(log c_b x weight), weight n / (n + online_prior) after n observations (1 when
 * online_prior is 0); an observing sencache-plan's (ABI 7) alike. Other rules: SC_ERR_INVALID_ARGUMENT. */
SC_API sc_status sc_policy_factor(const sc_policy* policy, double* factor_out, int32_t batch);
/* How many decisions so far moved anchors at a timestep outside the table (clamped look-ups). */
SC_API sc_status sc_policy_outside_table(const sc_policy* policy, int64_t* count);
/* Back to the state before step 0 (a new request with the same settings and sizes). */
SC_API sc_status sc_policy_reset(sc_policy* policy);
SC_API void sc_policy_destroy(sc_policy* policy);

/* ---- The drift kernel on the caller's CUDA stream (libsencache_policy built with CUDA) ------ */

typedef enum sc_dtype { SC_FP32 = 0, SC_FP16 = 1, SC_BF16 = 2 } sc_dtype;
typedef struct sc_drift sc_drift;

/* Scratch for batches of up to `max_samples` samples of `per_sample` elements: device partials,
 * device sums, pinned host sums and one event, on the current device. */
SC_API sc_status sc_drift_create(int32_t max_samples, int64_t per_sample, sc_drift** out);
/* Enqueue on `cuda_stream` (a cudaStream_t; NULL: the legacy default stream) the fused kernel for
 * `samples` samples: sums of (x - anchor)^2 per sample (the anchors are only read: move a
 * sample's anchor after deciding that it runs). Then an asynchronous copy of the sums to pinned memory and one event. Returns without waiting. */
SC_API sc_status sc_drift_launch(sc_drift* drift, const void* x, const void* anchor, int32_t samples,
                                 sc_dtype dtype, void* cuda_stream);
/* Wait on that event and copy the `samples` sums to sums_out (host). */
SC_API sc_status sc_drift_wait(sc_drift* drift, float* sums_out, int32_t samples);
SC_API void sc_drift_destroy(sc_drift* drift);
/* 1 if this library was built with the CUDA drift kernel, else 0. */
SC_API int sc_drift_available(void);

/* ---- The whole engine through the embedded Python runtime (libsencache) --------------------- */

typedef struct sc_engine sc_engine;

typedef struct sc_engine_options {
    const char* backend; /* "auto" (the one the bundle was built for), "onnxruntime", "torch", ...; NULL: auto */
    const char* device;  /* "cpu", "cuda", "cuda:1"; NULL: cpu */
    int32_t threads;     /* CPU threads of the backend; 0: all */
} sc_engine_options;

typedef struct sc_request {
    const char* prompt;                  /* text; with prompt_embeds it only labels the video */
    const float* prompt_embeds;          /* NULL, or [embed_tokens, embed_channels] row-major */
    int64_t embed_tokens, embed_channels;
    uint64_t seed;                       /* < 2^63 */
    int32_t steps;                       /* 0: the bundle's default */
    double guidance;                     /* < 0: the bundle's default */
    const char* cache;                   /* "sencache", "sencache-max", "sencache-online", "none", "fixed", "teacache", "magcache"; NULL: sencache */
    const char* knobs_json;              /* NULL, or a JSON object of knobs: {"eps_main": 0.1, "max_reuse": 3} */
} sc_request;

/* The first frame of an image-to-video request: RGB pixels, 8 bits per channel, row-major with
 * `stride` bytes from one row to the next (>= width * channels). The engine copies it before
 * sc_engine_submit_image returns and resizes it to the video as the model's pipeline does. */
typedef struct sc_image {
    const uint8_t* pixels;
    int32_t width, height; /* each in [16, 4096] */
    int32_t channels;      /* 3 (RGB) */
    int64_t stride;        /* bytes per row */
} sc_image;
/* Request parameters beyond sc_request, which keeps its layout. `size` is sizeof(sc_request_extra)
 * as the caller was compiled: fields past it take their defaults, so a caller built against an
 * older header keeps working when fields are added; a size larger than this library knows is
 * refused (SC_ERR_UNSUPPORTED) rather than its fields ignored. Zero-initialise, then set size. */
typedef struct sc_request_extra {
    size_t size;
    double guidance_2; /* the second (low-noise) expert's guidance of a two-expert bundle (Wan 2.2
                        * A14B; Python's guidance_2, the CLI's --guidance-2); < 0: the bundle's when
                        * guidance is < 0 too, else guidance, as diffusers' pipeline takes it. A
                        * one-expert bundle refuses a value >= 0. */
} sc_request_extra;
typedef enum sc_state { SC_QUEUED = 0, SC_RUNNING = 1, SC_DONE = 2, SC_CANCELLED = 3, SC_FAILED = 4 } sc_state;

typedef struct sc_progress {
    sc_state state;
    int32_t step;  /* steps taken */
    int32_t steps; /* steps of the request */
    int32_t nfe;   /* evaluations of the blocks so far */
} sc_progress;

/* Called after each sc_engine_step for every request that took part or ended in it. */
typedef void (*sc_progress_fn)(void* user, int64_t request_id, const sc_progress* progress);

SC_API sc_status sc_engine_create(const char* bundle_dir, const sc_engine_options* options, sc_engine** out);
SC_API sc_status sc_engine_set_progress(sc_engine* engine, sc_progress_fn fn, void* user);
/* Validate and queue one request; *id_out is its id (> 0). */
SC_API sc_status sc_engine_submit(sc_engine* engine, const sc_request* request, int64_t* id_out);
/* sc_engine_submit with an image: an image-to-video bundle requires one (image NULL is refused),
 * a text-to-video bundle refuses one; bad pixels, sizes or strides are refused before queueing,
 * the message naming the field of sc_image. sc_engine_submit is this call with image NULL. */
SC_API sc_status sc_engine_submit_image(sc_engine* engine, const sc_request* request, const sc_image* image,
                                        int64_t* id_out);
/* sc_engine_submit_image with further parameters (`extra` may be NULL: all their defaults). A bad
 * extra->size or field is refused before queueing, the message naming it. */
SC_API sc_status sc_engine_submit_ex(sc_engine* engine, const sc_request* request, const sc_image* image,
                                     const sc_request_extra* extra, int64_t* id_out);
/* One pass of the step engine: admit queued requests at the step boundary, advance every active
 * one by one step. *active_out (may be NULL): requests still queued or running afterwards. */
SC_API sc_status sc_engine_step(sc_engine* engine, int32_t* active_out);
SC_API sc_status sc_engine_poll(sc_engine* engine, int64_t id, sc_progress* out);
/* Cancel: a queued request at once, a running one at the next step boundary. *cancelled_out
 * (may be NULL): 0 when it had already ended. */
SC_API sc_status sc_engine_cancel(sc_engine* engine, int64_t id, int* cancelled_out);
/* The frame shape of request `id` once done: frames, height, width, channels (3). */
SC_API sc_status sc_engine_frames_shape(sc_engine* engine, int64_t id, int64_t shape_out[4]);
/* Decode a done request's video into `out` (float32 [T, H, W, 3] in [0, 1]); `count` is the
 * number of floats in `out` and must equal T*H*W*3. */
SC_API sc_status sc_engine_copy_frames(sc_engine* engine, int64_t id, float* out, size_t count);
/* Forget an ended request (frames included). */
SC_API sc_status sc_engine_release(sc_engine* engine, int64_t id);
/* End every request as cancelled and free the engine; NULL is a no-op. */
SC_API void sc_engine_destroy(sc_engine* engine);

#ifdef __cplusplus
}
#endif

#endif
