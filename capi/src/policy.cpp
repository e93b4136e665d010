// Sensitivity tables and the SenCache rules, native: the same arithmetic as
// runtime/sensitivity.py (SensitivityTable, its budget curves) and runtime/cache/sencache.py
// (SenCachePolicy, SenCacheMaxPolicy, SenCacheOnlinePolicy with its OnlineFactor), and the NFE
// budgets of runtime/cache/budget.py (make_budget_policy, make_online_budget_policy; their
// arithmetic in budget.cpp), in double, operation for operation, so decisions agree bit for bit.
// Build with -ffp-contract=off: a fused multiply-add would round differently from NumPy. exp and
// log are the C library's, which the Python rule calls too (through `math`).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <mutex>
#include <unordered_set>
#include <numeric>
#include <optional>
#include <vector>

#include "budget.hpp"
#include "common.hpp"
#include "json.hpp"
#include "npz.hpp"

using sencache::Error;
using sencache::guarded;

namespace {

constexpr int32_t kMaxSteps = 1000;  // runtime/manifest.py MAX_STEPS
const char* const kFormat = "sencache-sensitivity/1";
const char* const kRecalibrate = "recalibrate the bundle (`sencache calibrate`) to record them";

// Handles not yet destroyed, so that destroying one twice is a no-op rather than a double free.
std::mutex live_mutex;
std::unordered_set<const void*> live;

void track(const void* handle) {
    std::lock_guard<std::mutex> lock(live_mutex);
    live.insert(handle);
}

bool untrack(const void* handle) {
    std::lock_guard<std::mutex> lock(live_mutex);
    return live.erase(handle) == 1;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(SC_ERR_NOT_FOUND, "no such file: " + path);
    std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (f.bad()) throw Error(SC_ERR_CORRUPT, "cannot read " + path);
    return data;
}

}  // namespace

struct sc_table {
    std::vector<double> t, jx, jt;  // sorted by t
    std::shared_ptr<const sencache::budget::Curves> budget;  // NFE-budget curves; null: none recorded

    // SensitivityTable.__post_init__: the same checks, then sort by timestep.
    static std::shared_ptr<sc_table> make(std::vector<double> t, std::vector<double> jx, std::vector<double> jt,
                                          const std::vector<std::pair<std::string, const std::vector<double>*>>& extra) {
        const auto check = [&](const char* name, const std::vector<double>& v) {
            SC_REQUIRE(v.size() == t.size(), SC_ERR_CORRUPT, std::string(name) + " must be a list as long as timesteps");
            for (double x : v)
                SC_REQUIRE(std::isfinite(x), SC_ERR_CORRUPT, std::string(name) + " holds NaN or infinite values");
        };
        check("timesteps", t);
        check("Jx", jx);
        check("Jt", jt);
        for (const auto& [name, values] : extra) check(name.c_str(), *values);
        SC_REQUIRE(t.size() >= 2, SC_ERR_CORRUPT, "needs at least two timesteps");
        for (size_t i = 0; i < t.size(); ++i)
            SC_REQUIRE(jx[i] >= 0 && jt[i] >= 0, SC_ERR_CORRUPT, "Jx and Jt must be non-negative");
        std::vector<size_t> order(t.size());
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return t[a] < t[b]; });
        auto table = std::make_shared<sc_table>();
        for (size_t i : order) {
            table->t.push_back(t[i]);
            table->jx.push_back(jx[i]);
            table->jt.push_back(jt[i]);
        }
        for (size_t i = 1; i < table->t.size(); ++i)
            SC_REQUIRE(table->t[i] - table->t[i - 1] > 0, SC_ERR_CORRUPT, "timesteps must be distinct");
        return table;
    }

    static double interp(double x, const std::vector<double>& xp, const std::vector<double>& fp) {
        return sencache::budget::interp(x, xp, fp);
    }

    void lookup(double at, double& jx_out, double& jt_out, bool& inside) const {
        inside = t.front() <= at && at <= t.back();
        jx_out = interp(at, t, jx);
        jt_out = interp(at, t, jt);
    }
};

namespace {

std::vector<double> vector_of(const sencache::json::Value* v, const char* name) {
    using sencache::json::Value;
    SC_REQUIRE(v != nullptr, SC_ERR_CORRUPT, std::string("missing '") + name + "'");
    SC_REQUIRE(v->kind == Value::Array, SC_ERR_CORRUPT, "tables must be lists of numbers");
    std::vector<double> out;
    out.reserve(v->items.size());
    for (const Value& item : v->items) {
        SC_REQUIRE(item.kind == Value::Number, SC_ERR_CORRUPT, "tables must be lists of numbers");
        out.push_back(item.number);
    }
    return out;
}

std::shared_ptr<sc_table> parse_table(const std::string& data, const std::string& source) {
    using sencache::json::Value;
    Value doc;
    try {
        doc = sencache::json::parse(data.data(), data.size());
    } catch (const std::runtime_error& e) {
        throw Error(SC_ERR_CORRUPT, "corrupt sensitivity table " + source + ": " + e.what());
    }
    const Value* format = doc.kind == Value::Object ? doc.find("format") : nullptr;
    if (format == nullptr || format->kind != Value::String || format->text != kFormat)
        throw Error(SC_ERR_CORRUPT, "corrupt sensitivity table " + source + ": not a " + kFormat + " file");
    std::shared_ptr<const sencache::budget::Curves> budget;
    const Value* curves = doc.find("budget");
    if (curves != nullptr && curves->kind != Value::Null) {
        try {
            budget = std::make_shared<const sencache::budget::Curves>(sencache::budget::parse(*curves));
        } catch (const std::invalid_argument& e) {
            throw Error(SC_ERR_CORRUPT,
                        "corrupt NFE-budget curves in " + source + " (" + e.what() + "): " + kRecalibrate);
        }
    }
    try {
        const Value* meta = doc.find("meta");
        SC_REQUIRE(meta == nullptr || meta->kind == Value::Object, SC_ERR_CORRUPT, "meta must be an object");
        std::vector<double> t = vector_of(doc.find("timesteps"), "timesteps");
        std::vector<double> jx = vector_of(doc.find("Jx"), "Jx");
        std::vector<double> jt = vector_of(doc.find("Jt"), "Jt");
        std::vector<std::vector<double>> optional;
        std::vector<std::pair<std::string, const std::vector<double>*>> extra;
        for (const char* name : {"counts", "Jx_std", "Jt_std"}) {
            const Value* v = doc.find(name);
            if (v != nullptr && v->kind != Value::Null) optional.push_back(vector_of(v, name));
        }
        size_t k = 0;
        for (const char* name : {"counts", "Jx_std", "Jt_std"}) {
            const Value* v = doc.find(name);
            if (v != nullptr && v->kind != Value::Null) extra.emplace_back(name, &optional[k++]);
        }
        auto table = sc_table::make(std::move(t), std::move(jx), std::move(jt), extra);
        table->budget = std::move(budget);
        return table;
    } catch (const Error& e) {
        throw Error(SC_ERR_CORRUPT, "corrupt sensitivity table " + source + ": " + e.what());
    }
}

}  // namespace

// The handle the caller holds: a shared reference, so policies outlive the caller's table.
struct sc_table_handle {
    std::shared_ptr<sc_table> table;
};

namespace {

sc_status hand_out(std::shared_ptr<sc_table> table, sc_table** out) {
    *out = reinterpret_cast<sc_table*>(new sc_table_handle{std::move(table)});
    track(*out);
    return SC_OK;
}

const std::shared_ptr<sc_table>& unwrap(const sc_table* handle) {
    return reinterpret_cast<const sc_table_handle*>(handle)->table;
}

}  // namespace

extern "C" sc_status sc_table_parse_json(const char* data, size_t size, sc_table** out) {
    return guarded([&] {
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        *out = nullptr;
        SC_REQUIRE(data != nullptr, SC_ERR_INVALID_ARGUMENT, "data is NULL");
        return hand_out(parse_table(std::string(data, size), "(memory)"), out);
    });
}

extern "C" sc_status sc_table_load_json(const char* path, sc_table** out) {
    return guarded([&] {
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        *out = nullptr;
        SC_REQUIRE(path != nullptr, SC_ERR_INVALID_ARGUMENT, "path is NULL");
        return hand_out(parse_table(read_file(path), path), out);
    });
}

extern "C" sc_status sc_table_load_bundle(const char* bundle_dir, sc_table** out) {
    return guarded([&] {
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        *out = nullptr;
        SC_REQUIRE(bundle_dir != nullptr, SC_ERR_INVALID_ARGUMENT, "bundle_dir is NULL");
        const std::string path = std::string(bundle_dir) + "/sensitivity.json";
        std::ifstream probe(path);
        SC_REQUIRE(probe.good(), SC_ERR_NOT_FOUND,
                   std::string("no sensitivity table in ") + bundle_dir + ": run `sencache calibrate --engine " +
                       bundle_dir + "` first");
        return hand_out(parse_table(read_file(path), path), out);
    });
}

extern "C" sc_status sc_table_load_npz(const char* path, sc_table** out) {
    return guarded([&] {
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        *out = nullptr;
        SC_REQUIRE(path != nullptr, SC_ERR_INVALID_ARGUMENT, "path is NULL");
        const std::string p = path;
        auto arrays = sencache::npz::load(p, {"timesteps", "J_x_norm", "J_t_norm", "sample_counts"});
        std::string missing;
        for (const char* key : {"J_t_norm", "J_x_norm", "timesteps"})
            if (arrays.count(key) == 0) missing += std::string(missing.empty() ? "" : ", ") + key;
        SC_REQUIRE(missing.empty(), SC_ERR_CORRUPT, p + ": not a SenCache sensitivity .npz (missing " + missing + ")");
        for (const auto& [key, a] : arrays)
            SC_REQUIRE(a.shape.size() == 1, SC_ERR_CORRUPT, p + ": " + key + " must be one-dimensional");
        std::vector<std::pair<std::string, const std::vector<double>*>> extra;
        if (arrays.count("sample_counts")) extra.emplace_back("counts", &arrays["sample_counts"].values);
        try {
            return hand_out(sc_table::make(arrays["timesteps"].values, arrays["J_x_norm"].values,
                                           arrays["J_t_norm"].values, extra), out);
        } catch (const Error& e) {
            throw Error(e.status, p + ": " + e.what());
        }
    });
}

extern "C" int sc_table_has_budget(const sc_table* table) {
    if (table == nullptr || !unwrap(table)->budget) return 0;
    return unwrap(table)->budget->online ? 2 : 1;
}

extern "C" size_t sc_table_size(const sc_table* table) { return table ? unwrap(table)->t.size() : 0; }

extern "C" sc_status sc_table_lookup(const sc_table* table, double t, double* jx, double* jt, int* inside) {
    return guarded([&] {
        SC_REQUIRE(table != nullptr, SC_ERR_INVALID_ARGUMENT, "table is NULL");
        double x, y;
        bool in;
        unwrap(table)->lookup(t, x, y, in);
        if (jx) *jx = x;
        if (jt) *jt = y;
        if (inside) *inside = in ? 1 : 0;
        return SC_OK;
    });
}

extern "C" void sc_table_destroy(sc_table* table) {
    if (table && untrack(table)) delete reinterpret_cast<sc_table_handle*>(table);
}

// ---- the rule ----------------------------------------------------------------------------------

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Each sample's learnt factor of the online rule: OnlineFactor in runtime/cache/sencache.py.
struct OnlineFactor {
    double rate = 0, log_bound = 0, prior = 0;
    std::vector<double> log_factor, predicted;  // predicted: the table's score of the last decided step
    std::vector<int64_t> observations;
    int32_t decided_step = -1;

    void reset(int32_t batch) {
        log_factor.assign(batch, 0.0);
        observations.assign(batch, 0);
        predicted.assign(batch, kNaN);
        decided_step = -1;
    }

    // factor: exp(log c_b x n / max(n + prior, 1e-300)), the weight 1 when prior is 0.
    double factor(size_t b) const {
        double weight = 1.0;
        if (prior > 0) {
            const double n = static_cast<double>(observations[b]);
            weight = n / std::max(n + prior, 1e-300);
        }
        return std::exp(log_factor[b] * weight);
    }

    void start(int32_t step) {
        std::fill(predicted.begin(), predicted.end(), kNaN);
        decided_step = step;
    }

    // observe(step, error) with error = sqrt(error_sumsq) / scale, as SenCacheOnlinePolicy passes it.
    void observe(const double* error_sumsq, double scale) {
        for (size_t b = 0; b < log_factor.size(); ++b) {
            const double error = std::sqrt(error_sumsq[b]) / scale;
            if (!(std::isfinite(error) && std::isfinite(predicted[b]) && predicted[b] > 0)) continue;
            // np.clip: log(0) = -inf and log(inf) = inf meet the bound; x itself where it equals one
            double ratio = std::log(error / predicted[b]);
            ratio = ratio < -log_bound ? -log_bound : ratio;
            ratio = ratio > log_bound ? log_bound : ratio;
            log_factor[b] = (1.0 - rate) * log_factor[b] + rate * ratio;
            observations[b] += 1;
        }
    }
};

// runtime/cache/plan.py OBSERVED_RATE, OBSERVED_BOUND and OBSERVED_PRIOR: an observing plan's learnt factor
constexpr double kObservedRate = 0.5;
constexpr double kObservedBound = 4.0;
constexpr double kObservedPrior = 4.0;

// What a budget resolved, for sc_policy_budget.
struct Resolved {
    double eps_start = kNaN, eps_main = kNaN;
    int32_t nfe = 0;
};

}  // namespace

struct sc_policy {
    std::shared_ptr<sc_table> table;
    sc_policy_settings settings;
    int32_t steps, batch;
    int64_t numel;
    int32_t switch_step;
    std::vector<double> anchor_t, jx, jt, scores;
    std::vector<int64_t> reuses;
    std::vector<uint8_t> run;
    double threshold = std::numeric_limits<double>::quiet_NaN();
    bool forced = false;
    int64_t outside = 0;
    OnlineFactor online;                           // SC_RULE_SENCACHE_ONLINE only
    std::unique_ptr<sencache::budget::Plan> plan;  // a budget's plan (hard mode; sencache-online's fallback)
    std::optional<Resolved> budget;                // made by sc_policy_create_budget
    std::vector<bool> schedule, schedule_forced;   // sencache-plan: each step's run flag; empty: none
    // sencache-plan re-planned per sample from its drift (LivePlan; score_sq empty: the schedule alone)
    std::vector<double> live_cost, live_later, live_score_sq;
    int32_t live_runs = 0;
    int64_t live_max_reuse = 0;  // the curves' (Python's plan reads them, not the int32 settings)
    std::vector<int64_t> live_left, live_anchor;
    // ObservingPlanPolicy: the calibration's mean observed reuse errors [steps][live_depth]; empty: not observed
    std::vector<double> live_error_sq;
    int64_t live_depth = 0;

    bool learns() const { return settings.rule == SC_RULE_SENCACHE_ONLINE || !live_error_sq.empty(); }

    void reset() {
        online.reset(batch);
        if (plan) plan->spent.assign(batch, 0);
        anchor_t.assign(batch, 0.0);
        jx.assign(batch, 0.0);
        jt.assign(batch, 0.0);
        reuses.assign(batch, 0);
        scores.assign(batch, std::numeric_limits<double>::quiet_NaN());
        run.assign(batch, 1);
        live_left.assign(batch, live_runs);
        live_anchor.assign(batch, 0);
        threshold = std::numeric_limits<double>::quiet_NaN();
        forced = false;
        outside = 0;
    }

    // SenCachePlanPolicy.decide with a live plan: each sample re-plans from its drift
    void decide_live(int32_t step, double t, const float* drift_sumsq) {
        const size_t n = static_cast<size_t>(steps);
        if (!live_error_sq.empty()) {  // ObservingPlanPolicy.decide: a run now expects the calibration's error
            online.start(step);
            for (int32_t b = 0; b < batch; ++b) {
                const int64_t d = step - live_anchor[b];
                const double mean = d >= 1 && d <= live_depth ? live_error_sq[live_anchor[b] * live_depth + d - 1] : 0.0;
                online.predicted[b] = mean > 0 ? std::sqrt(mean) : kNaN;
            }
        }
        for (int32_t b = 0; b < batch; ++b) {
            if (forced) {
                run[b] = 1;
                continue;
            }
            const int64_t a = live_anchor[b];
            const double drift = std::sqrt(static_cast<double>(drift_sumsq[b]));
            const double score = jx[b] * drift + jt[b] * std::fabs(t - anchor_t[b]);
            const double factor = live_error_sq.empty() ? 1.0 : online.factor(b);
            scores[b] = sencache::budget::drift_scale(score, live_score_sq[a * n + step]) * (factor * factor);
            run[b] = sencache::budget::runs_now(&live_cost[a * n], live_later, live_runs, schedule_forced, step, a,
                                                live_left[b], live_max_reuse, scores[b])
                         ? 1
                         : 0;
        }
        bool any = false;
        for (int32_t b = 0; b < batch; ++b) {
            live_left[b] -= run[b];
            any = any || run[b];
        }
        if (!any || step >= steps - 1) return;
        double x, y;
        bool in;
        table->lookup(t, x, y, in);
        for (int32_t b = 0; b < batch; ++b) {
            if (!run[b]) continue;
            live_anchor[b] = step;
            anchor_t[b] = t;
            jx[b] = x;
            jt[b] = y;
        }
    }

    bool is_forced(int32_t step) const { return step == 0 || (settings.force_last && step == steps - 1); }

    void decide(int32_t step, double t, const float* drift_sumsq) {
        if (!schedule.empty()) {  // SenCachePlanPolicy.decide: every sample follows the schedule
            forced = schedule_forced[step];
            threshold = kNaN;
            std::fill(scores.begin(), scores.end(), kNaN);
            if (live_score_sq.empty())
                std::fill(run.begin(), run.end(), schedule[step] ? 1 : 0);
            else
                decide_live(step, t, drift_sumsq);
            return;
        }
        if (learns()) online.start(step);
        const double eps = step < switch_step ? settings.eps_start : settings.eps_main;
        forced = is_forced(step);
        threshold = plan ? kNaN : eps;  // StepDecision: no threshold under a plan
        if (forced) {
            std::fill(run.begin(), run.end(), 1);
            std::fill(scores.begin(), scores.end(), std::numeric_limits<double>::quiet_NaN());
        } else {
            double jx_now = 0, jt_now = 0;
            bool in = false;
            if (settings.rule == SC_RULE_SENCACHE_MAX) table->lookup(t, jx_now, jt_now, in);
            const double root = std::sqrt(static_cast<double>(numel));
            for (int32_t b = 0; b < batch; ++b) {
                const double drift = std::sqrt(static_cast<double>(drift_sumsq[b]));
                double sx = jx[b], st = jt[b];
                if (settings.rule == SC_RULE_SENCACHE_MAX) {  // np.maximum: NaN propagates
                    sx = (std::isnan(sx) || sx >= jx_now) ? sx : jx_now;
                    st = (std::isnan(st) || st >= jt_now) ? st : jt_now;
                }
                const double a = sx * drift;
                const double c = st * std::fabs(t - anchor_t[b]);
                double raw = a + c;
                if (learns()) {  // OnlineFactor.corrected: the table's score kept as the prediction
                    online.predicted[b] = raw / root;
                    raw = raw * online.factor(b);
                }
                if (plan && !plan->weights.empty()) raw = raw * plan->weights[step];  // SenCacheOnlineBudget
                scores[b] = raw / root;
                run[b] = plan ? plan->runs(step, b, scores[b], reuses[b], settings.max_reuse)
                              : !((scores[b] < eps) && (reuses[b] < settings.max_reuse));
            }
        }
        if (plan)
            for (int32_t b = 0; b < batch; ++b) plan->spent[b] += run[b];
        // _commit
        bool any = false;
        for (int32_t b = 0; b < batch; ++b) {
            reuses[b] = run[b] ? 0 : reuses[b] + 1;
            any = any || run[b];
        }
        if (any && step < steps - 1) {
            double x, y;
            bool in;
            table->lookup(t, x, y, in);
            if (!in) ++outside;
            for (int32_t b = 0; b < batch; ++b) {
                if (!run[b]) continue;
                anchor_t[b] = t;
                jx[b] = x;
                jt[b] = y;
            }
        }
    }
};

namespace {

void check_settings(const sc_policy_settings& s) {
    SC_REQUIRE(s.rule == SC_RULE_SENCACHE || s.rule == SC_RULE_SENCACHE_MAX || s.rule == SC_RULE_SENCACHE_ONLINE,
               SC_ERR_INVALID_ARGUMENT,
               "rule must be SC_RULE_SENCACHE, SC_RULE_SENCACHE_MAX or SC_RULE_SENCACHE_ONLINE");
    SC_REQUIRE(std::isfinite(s.eps_start) && s.eps_start >= 0, SC_ERR_INVALID_ARGUMENT,
               "settings.eps_start must be a finite number >= 0, got " + std::to_string(s.eps_start));
    SC_REQUIRE(std::isfinite(s.eps_main) && s.eps_main >= 0, SC_ERR_INVALID_ARGUMENT,
               "settings.eps_main must be a finite number >= 0, got " + std::to_string(s.eps_main));
    SC_REQUIRE(s.max_reuse >= 0 && s.max_reuse <= kMaxSteps, SC_ERR_INVALID_ARGUMENT,
               "settings.max_reuse must be in [0, 1000], got " + std::to_string(s.max_reuse));
    SC_REQUIRE(s.switch_frac >= 0.0 && s.switch_frac <= 1.0, SC_ERR_INVALID_ARGUMENT,
               "switch fraction must be in [0, 1], got " + std::to_string(s.switch_frac));
}

// The caller's sc_policy_extra with the fields past its `size` at their defaults, checked as
// runtime/cache/knobs.py bounds the knobs (NaN fails every comparison, so it is refused).
sc_policy_extra complete_extra(const sc_policy_extra* extra) {
    sc_policy_extra full SC_POLICY_EXTRA_DEFAULTS;
    if (extra == nullptr) return full;
    SC_REQUIRE(extra->size >= sizeof(extra->size), SC_ERR_INVALID_ARGUMENT,
               "extra->size must be sizeof(sc_policy_extra)");
    SC_REQUIRE(extra->size <= sizeof(sc_policy_extra), SC_ERR_UNSUPPORTED,
               "extra->size is larger than this library's sc_policy_extra (a newer sencache.h; see sc_abi_version)");
    const auto covered = [&](size_t offset) { return extra->size >= offset + sizeof(double); };
    if (covered(offsetof(sc_policy_extra, online_rate))) full.online_rate = extra->online_rate;
    if (covered(offsetof(sc_policy_extra, online_bound))) full.online_bound = extra->online_bound;
    if (covered(offsetof(sc_policy_extra, online_prior))) full.online_prior = extra->online_prior;
    const auto check = [](double value, double low, double high, const char* name, const char* range) {
        SC_REQUIRE(value >= low && value <= high, SC_ERR_INVALID_ARGUMENT,
                   std::string("extra->") + name + " must be a number in " + range + ", got " + std::to_string(value));
    };
    check(full.online_rate, 0.0, 1.0, "online_rate", "[0, 1]");
    check(full.online_bound, 1.0, 1e6, "online_bound", "[1, 1e+06]");
    check(full.online_prior, 0.0, 1e6, "online_prior", "[0, 1e+06]");
    return full;
}

sc_policy* checked_online(const sc_policy* policy, int32_t batch) {
    SC_REQUIRE(policy != nullptr, SC_ERR_INVALID_ARGUMENT, "policy is NULL");
    SC_REQUIRE(policy->learns(), SC_ERR_INVALID_ARGUMENT, "the policy does not learn from observed errors (SC_RULE_SENCACHE_ONLINE, or an observing "
               "SC_RULE_SENCACHE_PLAN)");
    SC_REQUIRE(batch == policy->batch, SC_ERR_BUFFER_SIZE,
               "batch " + std::to_string(batch) + " but the policy was made for " + std::to_string(policy->batch));
    return const_cast<sc_policy*>(policy);
}

}  // namespace

extern "C" sc_status sc_policy_settings_from_bundle(const char* bundle_dir, sc_policy_settings* out) {
    return guarded([&] {
        SC_REQUIRE(bundle_dir != nullptr && out != nullptr, SC_ERR_INVALID_ARGUMENT, "bundle_dir or out is NULL");
        const std::string path = std::string(bundle_dir) + "/manifest.json";
        const std::string data = read_file(path);
        using sencache::json::Value;
        Value doc;
        try {
            doc = sencache::json::parse(data.data(), data.size());
        } catch (const std::runtime_error& e) {
            throw Error(SC_ERR_CORRUPT, "corrupt manifest " + path + ": " + e.what());
        }
        const Value* defaults = doc.kind == Value::Object ? doc.find("defaults") : nullptr;
        const Value* s = defaults && defaults->kind == Value::Object ? defaults->find("sencache") : nullptr;
        SC_REQUIRE(s && s->kind == Value::Object, SC_ERR_CORRUPT, "corrupt manifest " + path + ": no defaults.sencache");
        const auto number = [&](const char* key) {
            const Value* v = s->find(key);
            SC_REQUIRE(v && v->kind == Value::Number, SC_ERR_CORRUPT,
                       "corrupt manifest " + path + ": defaults.sencache." + key + " is not a number");
            return v->number;
        };
        sc_policy_settings settings{SC_RULE_SENCACHE, number("eps_start"), number("eps_main"), 0, 0.2, 1};
        const double reuse = number("max_reuse");
        SC_REQUIRE(reuse == std::floor(reuse) && reuse >= 0 && reuse <= kMaxSteps, SC_ERR_CORRUPT,
                   "corrupt manifest " + path + ": defaults.sencache.max_reuse must be an integer in [0, 1000]");
        settings.max_reuse = static_cast<int32_t>(reuse);
        check_settings(settings);
        *out = settings;
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_create(const sc_table* table, const sc_policy_settings* settings, int32_t steps,
                                      int32_t batch, int64_t numel, sc_policy** out) {
    return sc_policy_create_ex(table, settings, nullptr, steps, batch, numel, out);
}

namespace {

// A policy of `settings` (checked) and the online knobs of `full` (checked), not yet tracked.
std::unique_ptr<sc_policy> make_policy(const std::shared_ptr<sc_table>& table, const sc_policy_settings& settings,
                                       const sc_policy_extra& full, int32_t steps, int32_t batch, int64_t numel) {
    SC_REQUIRE(steps > 0 && batch > 0 && numel > 0, SC_ERR_INVALID_ARGUMENT,
               "steps, batch and latent size must be positive");
    check_settings(settings);
    auto policy = std::make_unique<sc_policy>();
    policy->online.rate = full.online_rate;
    policy->online.log_bound = std::log(full.online_bound);
    policy->online.prior = full.online_prior;
    policy->table = table;
    policy->settings = settings;
    policy->steps = steps;
    policy->batch = batch;
    policy->numel = numel;
    // Python's round(): half to even, which nearbyint does in the default rounding mode.
    policy->switch_step = static_cast<int32_t>(std::nearbyint(settings.switch_frac * steps));
    policy->reset();
    return policy;
}

// What every policy constructor checks first: `out` given (and cleared), its `inputs` given, the
// sizes positive.
void check_create(sc_policy** out, bool given, const char* inputs, int32_t steps, int32_t batch, int64_t numel) {
    SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    SC_REQUIRE(given, SC_ERR_INVALID_ARGUMENT, std::string(inputs) + " is NULL");
    SC_REQUIRE(steps > 0 && batch > 0 && numel > 0, SC_ERR_INVALID_ARGUMENT,
               "steps, batch and latent size must be positive");
}

sc_status hand_out(std::unique_ptr<sc_policy> policy, sc_policy** out) {
    *out = policy.release();
    track(*out);
    return SC_OK;
}

}  // namespace

extern "C" sc_status sc_policy_create_ex(const sc_table* table, const sc_policy_settings* settings,
                                         const sc_policy_extra* extra, int32_t steps, int32_t batch, int64_t numel,
                                         sc_policy** out) {
    return guarded([&] {
        check_create(out, table != nullptr && settings != nullptr, "table or settings", steps, batch, numel);
        check_settings(*settings);
        const sc_policy_extra full = complete_extra(extra);
        return hand_out(make_policy(unwrap(table), *settings, full, steps, batch, numel), out);
    });
}

// ---- NFE budgets: runtime/cache/budget.py make_budget_policy, make_online_budget_policy ----------

namespace {

constexpr const char* kSpeedNames[] = {"lossless", "high", "balanced", "fast"};
constexpr double kSpeedFractions[] = {0.9, 0.75, 0.6, 0.45};  // knobs.py SPEEDS
constexpr double kBudgetPrior = 2.0;                          // budget.py BUDGET_PRIOR
constexpr double kMinEpsRatio = 1e-6;                         // budget.py MIN_EPS_RATIO

std::string format(const char* spec, double value) {
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, spec, value);
    return buffer;
}

// Python's repr of a float in [1, 1000] (fixed notation, the shortest digits that round-trip).
std::string python_repr(double value) {
    char buffer[64];
    const auto done = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::fixed);
    std::string text(buffer, done.ptr);
    return text.find('.') == std::string::npos ? text + ".0" : text;
}

// The caller's budget, checked as runtime/cache/knobs.py checks nfe, speedup, speed and budget.
sc_budget checked_budget(const sc_budget* budget) {
    SC_REQUIRE(budget->size >= sizeof(sc_budget), SC_ERR_INVALID_ARGUMENT,
               "budget->size must be sizeof(sc_budget)");
    SC_REQUIRE(budget->size <= sizeof(sc_budget), SC_ERR_UNSUPPORTED,
               "budget->size is larger than this library's sc_budget (a newer sencache.h; see sc_abi_version)");
    const sc_budget b = *budget;
    SC_REQUIRE(b.mode == SC_BUDGET_THRESHOLD || b.mode == SC_BUDGET_HARD, SC_ERR_INVALID_ARGUMENT,
               "budget->mode must be SC_BUDGET_THRESHOLD or SC_BUDGET_HARD");
    const std::string got = ", got " + format("%.17g", b.value);
    switch (b.kind) {
        case SC_BUDGET_NFE:
            SC_REQUIRE(b.value >= 1 && b.value <= kMaxSteps && std::floor(b.value) == b.value, SC_ERR_INVALID_ARGUMENT,
                       "budget->value: nfe must be an integer in [1, 1000]" + got);
            break;
        case SC_BUDGET_SPEEDUP:
            SC_REQUIRE(b.value >= 1 && b.value <= kMaxSteps, SC_ERR_INVALID_ARGUMENT,
                       "budget->value: speedup must be a number in [1, 1000]" + got);
            break;
        case SC_BUDGET_SPEED:
            SC_REQUIRE(b.speed >= SC_SPEED_LOSSLESS && b.speed <= SC_SPEED_FAST, SC_ERR_INVALID_ARGUMENT,
                       "budget->speed must be SC_SPEED_LOSSLESS, SC_SPEED_HIGH, SC_SPEED_BALANCED or SC_SPEED_FAST");
            break;
        default:
            throw Error(SC_ERR_INVALID_ARGUMENT,
                        "budget->kind must be SC_BUDGET_NFE, SC_BUDGET_SPEEDUP or SC_BUDGET_SPEED");
    }
    return b;
}

// What a request's budget asks for (budget_target): the knob's name and value as Python words
// them, the fraction of the steps and the runs per sample.
struct Target {
    std::string param, value;
    double fraction;
    int32_t runs;
};

Target budget_target(const sc_budget& b, int32_t steps, int32_t forced) {
    Target target;
    if (b.kind == SC_BUDGET_NFE) {
        target = {"nfe", std::to_string(static_cast<int32_t>(b.value)), 0.0, static_cast<int32_t>(b.value)};
        target.fraction = static_cast<double>(target.runs) / steps;
    } else {
        const bool speedup = b.kind == SC_BUDGET_SPEEDUP;
        target.param = speedup ? "speedup" : "speed";
        target.value = speedup ? python_repr(b.value) : kSpeedNames[b.speed];
        target.fraction = speedup ? 1.0 / b.value : kSpeedFractions[b.speed];
        target.runs = static_cast<int32_t>(std::nearbyint(steps * target.fraction));
    }
    SC_REQUIRE(forced <= target.runs && target.runs <= steps, SC_ERR_INVALID_ARGUMENT,
               target.param + " " + target.value + " asks for " + std::to_string(target.runs) + " runs of " +
                   std::to_string(steps) + " steps; a budget must lie in [" + std::to_string(forced) + ", " +
                   std::to_string(steps) + "] runs (" + std::to_string(forced) + " steps always run)");
    return target;
}

// The online knobs the caller gave (NULL: none; else each field its size covers), checked.
struct GivenOnline {
    std::optional<double> rate, bound, prior;
};

GivenOnline given_online(const sc_policy_extra* extra) {
    GivenOnline given;
    if (extra == nullptr) return given;
    complete_extra(extra);  // the size and every covered field checked
    const auto covered = [&](size_t offset) { return extra->size >= offset + sizeof(double); };
    if (covered(offsetof(sc_policy_extra, online_rate))) given.rate = extra->online_rate;
    if (covered(offsetof(sc_policy_extra, online_bound))) given.bound = extra->online_bound;
    if (covered(offsetof(sc_policy_extra, online_prior))) given.prior = extra->online_prior;
    return given;
}

std::unique_ptr<sc_policy> threshold_policy(const std::shared_ptr<sc_table>& table, const sc_policy_settings& planned,
                                            double eps, const sc_policy_extra& knobs, const Target& target,
                                            const sencache::budget::Curves& curves, int32_t steps, int32_t batch,
                                            int64_t numel) {
    sc_policy_settings chosen = planned;
    chosen.eps_start = curves.eps_ratio * eps;
    chosen.eps_main = eps;
    auto policy = make_policy(table, chosen, complete_extra(&knobs), steps, batch, numel);
    policy->budget = Resolved{chosen.eps_start, chosen.eps_main, target.runs};
    return policy;
}

// _online_threshold's refusal of online knobs other than those the curve was measured with.
void check_measured_knobs(const GivenOnline& given, const sencache::budget::OnlineCurve& online) {
    std::string other;
    const std::pair<const char*, std::pair<std::optional<double>, double>> knobs[] = {
        {"online_rate", {given.rate, online.rate}},
        {"online_bound", {given.bound, online.bound}},
        {"online_prior", {given.prior, online.prior}}};
    for (const auto& [name, values] : knobs)
        if (values.first && *values.first != values.second) other += std::string(other.empty() ? "" : ", ") + name;
    SC_REQUIRE(other.empty(), SC_ERR_INVALID_ARGUMENT,
               other + ": a threshold budget runs the online rule with the knobs its curve was measured with (" +
                   "online_rate " + format("%g", online.rate) + ", online_bound " + format("%g", online.bound) +
                   ", online_prior " + format("%g", online.prior) + "); ask for budget hard");
}

// runtime/cache/plan.py make_plan_policy (the caller checked the costs are there): the cheapest
// schedule of the budget's runs over the table's reuse costs, which every sample follows.
std::unique_ptr<sc_policy> plan_policy(const std::shared_ptr<sc_table>& table, sc_policy_settings planned,
                                       const Target& target, const sencache::budget::Curves& curves, int32_t steps,
                                       int32_t batch, int64_t numel) {
    planned.rule = SC_RULE_SENCACHE;  // the settings hold the conventions; the schedule decides
    auto policy = make_policy(table, planned, complete_extra(nullptr), steps, batch, numel);
    std::vector<bool> forced(steps);
    for (int32_t i = 0; i < steps; ++i) forced[i] = policy->is_forced(i);
    std::optional<std::vector<bool>> schedule = sencache::budget::plan_schedule(
        sencache::budget::costs_at(*curves.costs, steps), target.runs, forced, curves.max_reuse);
    if (!schedule) {
        const int last = forced.back() ? 1 : 0;
        const double fewest =
            std::ceil(static_cast<double>(steps - last) / static_cast<double>(curves.max_reuse + 1)) + last;
        SC_REQUIRE(false, SC_ERR_INVALID_ARGUMENT,
                   target.param + " " + target.value + " asks for " + std::to_string(target.runs) + " runs of " +
                       std::to_string(steps) + " steps; reusing at most " + std::to_string(curves.max_reuse) +
                       " steps in a row (the calibrated max_reuse) needs at least about " + format("%.0f", fewest));
    }
    policy->schedule = std::move(*schedule);
    policy->live_score_sq = sencache::budget::scores_at(*curves.costs, steps);
    if (!policy->live_score_sq.empty()) {  // _live_plan
        policy->live_cost = sencache::budget::costs_at(*curves.costs, steps);
        policy->live_runs = target.runs;
        policy->live_max_reuse = curves.max_reuse;
        policy->live_later = sencache::budget::later_costs(policy->live_cost, target.runs, forced, curves.max_reuse);
        policy->live_left.assign(batch, target.runs);
        policy->live_anchor.assign(batch, 0);
        if (!curves.costs->error_sq.empty() && curves.costs->steps == steps) {  // ObservingPlanPolicy
            policy->live_error_sq = curves.costs->error_sq;
            policy->live_depth = curves.costs->error_depth;
            policy->online.rate = kObservedRate;
            policy->online.log_bound = std::log(kObservedBound);
            policy->online.prior = kObservedPrior;
            policy->online.reset(batch);
        }
    }
    policy->schedule_forced = std::move(forced);
    policy->budget = Resolved{kNaN, kNaN, target.runs};
    return policy;
}

std::unique_ptr<sc_policy> budget_policy(const std::shared_ptr<sc_table>& table, sc_rule rule,
                                         const GivenOnline& given, const sc_budget& b, int32_t steps, int32_t batch,
                                         int64_t numel) {
    SC_REQUIRE(table->budget != nullptr, SC_ERR_INVALID_ARGUMENT,
               std::string("the sensitivity table has no NFE-budget curves: ") + kRecalibrate);
    const sencache::budget::Curves& curves = *table->budget;
    const int32_t max_reuse = static_cast<int32_t>(std::min<int64_t>(curves.max_reuse, INT32_MAX));
    const sc_policy_settings planned{rule, 0.0, 0.0, max_reuse, curves.switch_frac, curves.force_last ? 1 : 0};
    const int32_t forced = 1 + (curves.force_last && steps > 1 ? 1 : 0);
    if (rule == SC_RULE_SENCACHE_PLAN)
        SC_REQUIRE(curves.costs.has_value(), SC_ERR_INVALID_ARGUMENT,
                   "cache sencache-plan: the bundle's sensitivity table has no reuse costs (calibrated before "
                   "them); recalibrate it (`sencache calibrate`)");
    const Target target = budget_target(b, steps, forced);
    if (rule == SC_RULE_SENCACHE_PLAN) return plan_policy(table, planned, target, curves, steps, batch, numel);
    const double requested = target.fraction * steps;
    if (b.mode == SC_BUDGET_THRESHOLD && rule == SC_RULE_SENCACHE) {
        const std::optional<double> eps = sencache::budget::eps_for_fraction(curves, steps, target.fraction);
        SC_REQUIRE(eps.has_value(), SC_ERR_INVALID_ARGUMENT,
                   target.param + " " + target.value + " asks for " + format("%.1f", requested) + " runs of " +
                       std::to_string(steps) + " steps, fewer than the threshold rule reaches (about " +
                       format("%.1f", sencache::budget::fraction_curve(curves, steps).back() * steps) +
                       ", at max_reuse " + std::to_string(curves.max_reuse) + "): ask for budget hard");
        return threshold_policy(table, planned, *eps, SC_POLICY_EXTRA_DEFAULTS, target, curves, steps, batch, numel);
    }
    if (b.mode == SC_BUDGET_THRESHOLD && curves.online) {
        const sencache::budget::OnlineCurve& online = *curves.online;
        check_measured_knobs(given, online);
        const std::optional<double> eps = sencache::budget::online_eps_for_fraction(curves, steps, target.fraction);
        SC_REQUIRE(eps.has_value(), SC_ERR_INVALID_ARGUMENT,
                   target.param + " " + target.value + " asks for " + format("%.1f", requested) + " runs of " +
                       std::to_string(steps) + " steps, outside what the online rule's measured curve reaches (about " +
                       format("%.1f", online.fractions.back() * steps) + "-" +
                       format("%.1f", online.fractions.front() * steps) + "): ask for budget hard");
        const sc_policy_extra knobs{sizeof(sc_policy_extra), online.rate, online.bound, online.prior};
        return threshold_policy(table, planned, *eps, knobs, target, curves, steps, batch, numel);
    }
    // the plan: SenCacheHardBudget, or SenCacheOnlineBudget (its learnt factor and step weights)
    const sc_policy_extra knobs{sizeof(sc_policy_extra), given.rate.value_or(0.5), given.bound.value_or(4.0),
                                given.prior.value_or(kBudgetPrior)};
    auto policy = make_policy(table, planned, complete_extra(&knobs), steps, batch, numel);
    std::vector<bool> forced_steps(steps);
    for (int32_t i = 0; i < steps; ++i) forced_steps[i] = policy->is_forced(i);
    std::vector<double> profile = sencache::budget::step_profile(curves, steps), weights;
    if (rule == SC_RULE_SENCACHE_ONLINE) {
        const double early = 1.0 / std::max(curves.eps_ratio, kMinEpsRatio);
        for (int32_t i = 0; i < steps; ++i) weights.push_back(i < policy->switch_step ? early : 1.0);
        for (int32_t i = 0; i < steps; ++i) profile[i] = profile[i] * weights[i];
    }
    const bool capped = rule == SC_RULE_SENCACHE_ONLINE && b.mode == SC_BUDGET_THRESHOLD;
    policy->plan = std::make_unique<sencache::budget::Plan>(target.runs, capped, forced_steps, profile);
    policy->plan->weights = std::move(weights);
    policy->plan->spent.assign(batch, 0);
    policy->budget = Resolved{kNaN, kNaN, target.runs};
    return policy;
}

}  // namespace

extern "C" sc_status sc_policy_create_budget(const sc_table* table, sc_rule rule, const sc_policy_extra* extra,
                                             const sc_budget* budget, int32_t steps, int32_t batch, int64_t numel,
                                             sc_policy** out) {
    return guarded([&] {
        check_create(out, table != nullptr && budget != nullptr, "table or budget", steps, batch, numel);
        SC_REQUIRE(steps <= kMaxSteps, SC_ERR_INVALID_ARGUMENT,
                   "steps must be at most 1000 with a budget, got " + std::to_string(steps));
        SC_REQUIRE(rule != SC_RULE_SENCACHE_MAX, SC_ERR_INVALID_ARGUMENT,
                   "SC_RULE_SENCACHE_MAX takes no NFE budget: budget does not apply to cache 'sencache-max'");
        SC_REQUIRE(rule == SC_RULE_SENCACHE || rule == SC_RULE_SENCACHE_ONLINE || rule == SC_RULE_SENCACHE_PLAN,
                   SC_ERR_INVALID_ARGUMENT,
                   "rule must be SC_RULE_SENCACHE, SC_RULE_SENCACHE_ONLINE or SC_RULE_SENCACHE_PLAN");
        const GivenOnline given = given_online(extra);
        const sc_budget b = checked_budget(budget);
        return hand_out(budget_policy(unwrap(table), rule, given, b, steps, batch, numel), out);
    });
}

extern "C" sc_status sc_policy_budget(const sc_policy* policy, double* eps_start, double* eps_main, int32_t* nfe) {
    return guarded([&] {
        SC_REQUIRE(policy != nullptr, SC_ERR_INVALID_ARGUMENT, "policy is NULL");
        SC_REQUIRE(policy->budget.has_value(), SC_ERR_INVALID_ARGUMENT, "the policy was made without a budget");
        if (eps_start) *eps_start = policy->budget->eps_start;
        if (eps_main) *eps_main = policy->budget->eps_main;
        if (nfe) *nfe = policy->budget->nfe;
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_decide(sc_policy* policy, int32_t step, double t, const float* drift_sumsq,
                                      uint8_t* run_mask_out, int32_t batch) {
    return guarded([&] {
        SC_REQUIRE(policy != nullptr && run_mask_out != nullptr, SC_ERR_INVALID_ARGUMENT, "policy or run_mask_out is NULL");
        SC_REQUIRE(batch == policy->batch, SC_ERR_BUFFER_SIZE,
                   "batch " + std::to_string(batch) + " but the policy was made for " + std::to_string(policy->batch));
        SC_REQUIRE(step >= 0 && step < policy->steps, SC_ERR_INVALID_ARGUMENT,
                   "step " + std::to_string(step) + " outside [0, " + std::to_string(policy->steps) + ")");
        SC_REQUIRE(std::isfinite(t), SC_ERR_INVALID_ARGUMENT, "timestep must be finite");
        const bool planned = !policy->schedule.empty();
        SC_REQUIRE(drift_sumsq != nullptr || (planned ? policy->live_score_sq.empty() || policy->schedule_forced[step]
                                                      : policy->is_forced(step)),
                   SC_ERR_INVALID_ARGUMENT,
                   planned ? "drift_sumsq is NULL on a step that is not forced: this table's sencache-plan re-plans "
                             "each sample from its drift"
                           : "drift_sumsq is NULL on a step that is not forced");
        policy->decide(step, t, drift_sumsq);
        std::memcpy(run_mask_out, policy->run.data(), policy->run.size());
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_last(const sc_policy* policy, double* scores_out, int32_t batch, double* threshold,
                                    int* forced) {
    return guarded([&] {
        SC_REQUIRE(policy != nullptr, SC_ERR_INVALID_ARGUMENT, "policy is NULL");
        if (scores_out) {
            SC_REQUIRE(batch == policy->batch, SC_ERR_BUFFER_SIZE,
                       "batch " + std::to_string(batch) + " but the policy was made for " + std::to_string(policy->batch));
            std::copy(policy->scores.begin(), policy->scores.end(), scores_out);
        }
        if (threshold) *threshold = policy->threshold;
        if (forced) *forced = policy->forced ? 1 : 0;
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_observe(sc_policy* policy, int32_t step, const double* error_sumsq, int32_t batch) {
    return guarded([&] {
        sc_policy* p = checked_online(policy, batch);
        SC_REQUIRE(error_sumsq != nullptr, SC_ERR_INVALID_ARGUMENT, "error_sumsq is NULL");
        SC_REQUIRE(step == p->online.decided_step, SC_ERR_STATE,
                   "observe(step=" + std::to_string(step) + ") must follow the decision of that step (last: " +
                       std::to_string(p->online.decided_step) + ")");
        p->online.observe(error_sumsq, std::sqrt(static_cast<double>(p->numel)));
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_factor(const sc_policy* policy, double* factor_out, int32_t batch) {
    return guarded([&] {
        const sc_policy* p = checked_online(policy, batch);
        SC_REQUIRE(factor_out != nullptr, SC_ERR_INVALID_ARGUMENT, "factor_out is NULL");
        for (int32_t b = 0; b < batch; ++b) factor_out[b] = p->online.factor(b);
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_outside_table(const sc_policy* policy, int64_t* count) {
    return guarded([&] {
        SC_REQUIRE(policy != nullptr && count != nullptr, SC_ERR_INVALID_ARGUMENT, "policy or count is NULL");
        *count = policy->outside;
        return SC_OK;
    });
}

extern "C" sc_status sc_policy_reset(sc_policy* policy) {
    return guarded([&] {
        SC_REQUIRE(policy != nullptr, SC_ERR_INVALID_ARGUMENT, "policy is NULL");
        policy->reset();
        return SC_OK;
    });
}

extern "C" void sc_policy_destroy(sc_policy* policy) {
    if (policy && untrack(policy)) delete policy;
}
