// Bad input across the native ABI: nulls, missing and corrupt tables (JSON and .npz), wrong sizes,
// double destroy, the online rule's knobs and observations, NFE budgets. Every call must return a
// status and a message, never crash (also run under ASan).
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "sencache.h"

static int failures = 0;

#define EXPECT(status_expr, want)                                                                   \
    do {                                                                                           \
        const sc_status got_ = (status_expr);                                                      \
        if (got_ != (want)) {                                                                      \
            std::printf("FAIL %s:%d: %s -> %s (want %s): %s\n", __FILE__, __LINE__, #status_expr, \
                        sc_status_name(got_), sc_status_name(want), sc_last_error());              \
            ++failures;                                                                            \
        } else if (got_ != SC_OK && std::strlen(sc_last_error()) == 0) {                           \
            std::printf("FAIL %s:%d: %s gave no message\n", __FILE__, __LINE__, #status_expr);     \
            ++failures;                                                                            \
        }                                                                                          \
    } while (0)

static void write(const std::string& path, const std::string& data) {
    std::ofstream(path, std::ios::binary) << data;
}

int main(int argc, char** argv) {
    const std::string dir = argc > 1 ? argv[1] : ".";
    std::system(("mkdir -p '" + dir + "'").c_str());
    sc_table* table = nullptr;
    const std::string good = R"({"format": "sencache-sensitivity/1", "meta": {}, "timesteps": [1000, 500, 0],
                                 "Jx": [1.0, 2.0, 3.0], "Jt": [0.001, 0.002, 0.003]})";
    // nulls
    EXPECT(sc_table_parse_json(nullptr, 3, &table), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_table_parse_json(good.data(), good.size(), nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_table_load_json(nullptr, &table), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_table_load_npz(nullptr, &table), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_table_lookup(nullptr, 1.0, nullptr, nullptr, nullptr), SC_ERR_INVALID_ARGUMENT);
    // missing files
    EXPECT(sc_table_load_json((dir + "/nope.json").c_str(), &table), SC_ERR_NOT_FOUND);
    EXPECT(sc_table_load_npz((dir + "/nope.npz").c_str(), &table), SC_ERR_NOT_FOUND);
    EXPECT(sc_table_load_bundle((dir + "/no-bundle").c_str(), &table), SC_ERR_NOT_FOUND);
    // corrupt JSON tables
    const char* corrupt[] = {
        "", "{", "[1, 2]", "{\"format\": \"other\"}", "{\"format\": \"sencache-sensitivity/1\"}",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1, 2], "Jt": [1]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1], "Jx": [1], "Jt": [1]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 1], "Jx": [1, 2], "Jt": [1, 2]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [-1, 2], "Jt": [1, 2]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [NaN, 2], "Jt": [1, 2]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [true, 2], "Jt": [1, 2]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1, 2], "Jt": [1, 2], "meta": 3})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1, 2], "Jt": [1, 2], "counts": [1]})",
        R"({"format": "sencache-sensitivity/1", "timesteps": [1, 2], "Jx": [1e999, 2], "Jt": [1, 2]})",
        "{\"format\": \"sencache-sensitivity/1\", \"timesteps\": [1, 2], \"Jx\": [1, 2], \"Jt\": [1, 2]} extra",
    };
    for (const char* text : corrupt) EXPECT(sc_table_parse_json(text, std::strlen(text), &table), SC_ERR_CORRUPT);
    std::string deep(100000, '[');
    EXPECT(sc_table_parse_json(deep.data(), deep.size(), &table), SC_ERR_CORRUPT);
    // corrupt .npz files
    write(dir + "/empty.npz", "");
    write(dir + "/junk.npz", std::string(200, 'x'));
    write(dir + "/eocd.npz", std::string("PK\5\6") + std::string(18, '\xff'));
    EXPECT(sc_table_load_npz((dir + "/empty.npz").c_str(), &table), SC_ERR_CORRUPT);
    EXPECT(sc_table_load_npz((dir + "/junk.npz").c_str(), &table), SC_ERR_CORRUPT);
    EXPECT(sc_table_load_npz((dir + "/eocd.npz").c_str(), &table), SC_ERR_CORRUPT);
    // a good table, then the policy
    EXPECT(sc_table_parse_json(good.data(), good.size(), &table), SC_OK);
    double jx = 0, jt = 0;
    int inside = 0;
    EXPECT(sc_table_lookup(table, 250.0, &jx, &jt, &inside), SC_OK);
    if (!(jx == 2.5 && inside == 1)) { std::printf("FAIL lookup 250 -> %g %d\n", jx, inside); ++failures; }
    sc_policy_settings s{SC_RULE_SENCACHE, 0.01, 0.1, 3, 0.2, 1};
    sc_policy* policy = nullptr;
    EXPECT(sc_policy_create(nullptr, &s, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create(table, nullptr, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create(table, &s, 0, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create(table, &s, 10, 0, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create(table, &s, 10, 2, 0, &policy), SC_ERR_INVALID_ARGUMENT);
    sc_policy_settings bad = s;
    bad.eps_main = NAN;
    EXPECT(sc_policy_create(table, &bad, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    bad = s;
    bad.max_reuse = 1001;
    EXPECT(sc_policy_create(table, &bad, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    bad = s;
    bad.switch_frac = 1.5;
    EXPECT(sc_policy_create(table, &bad, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    bad = s;
    bad.rule = static_cast<sc_rule>(7);
    EXPECT(sc_policy_create(table, &bad, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create(table, &s, 10, 2, 100, &policy), SC_OK);
    sc_table_destroy(table);  // the policy keeps its own reference
    sc_table_destroy(table);  // double destroy: a no-op
    sc_table_destroy(nullptr);
    uint8_t run[2];
    const float drift[2] = {1.0f, 4.0f};
    EXPECT(sc_policy_decide(nullptr, 0, 1000.0, drift, run, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_decide(policy, 0, 1000.0, drift, nullptr, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_decide(policy, 0, 1000.0, drift, run, 3), SC_ERR_BUFFER_SIZE);
    EXPECT(sc_policy_decide(policy, 10, 1000.0, drift, run, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_decide(policy, -1, 1000.0, drift, run, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_decide(policy, 0, INFINITY, drift, run, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_decide(policy, 0, 1000.0, nullptr, run, 2), SC_OK);  // forced: no drift needed
    EXPECT(sc_policy_decide(policy, 1, 900.0, nullptr, run, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_decide(policy, 1, 900.0, drift, run, 2), SC_OK);
    double scores[2];
    EXPECT(sc_policy_last(policy, scores, 1, nullptr, nullptr), SC_ERR_BUFFER_SIZE);
    EXPECT(sc_policy_last(policy, scores, 2, nullptr, nullptr), SC_OK);
    EXPECT(sc_policy_outside_table(policy, nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_reset(nullptr), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_reset(policy), SC_OK);
    EXPECT(sc_policy_settings_from_bundle(nullptr, &s), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_settings_from_bundle((dir + "/no-bundle").c_str(), &s), SC_ERR_NOT_FOUND);
    sc_policy_destroy(policy);
    sc_policy_destroy(policy);  // double destroy: a no-op
    sc_policy_destroy(nullptr);
    // the online rule: its knobs (sc_policy_extra) refused as Python's SenCacheOnlineSettings
    // refuses them, whatever the rule; its observations only after the decision of their step
    EXPECT(sc_table_parse_json(good.data(), good.size(), &table), SC_OK);
    sc_policy_settings online = s;
    online.rule = SC_RULE_SENCACHE_ONLINE;
    const sc_policy_extra extra = SC_POLICY_EXTRA_DEFAULTS;
    sc_policy_extra bad_extra;
    const double bad_rates[] = {-0.1, 1.5, NAN, INFINITY};
    const double bad_bounds[] = {0.5, -4.0, 0.0, 2e6, INFINITY, NAN};
    const double bad_priors[] = {-1.0, 2e6, INFINITY, NAN};
    for (double v : bad_rates) {
        bad_extra = extra;
        bad_extra.online_rate = v;
        EXPECT(sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
        EXPECT(sc_policy_create_ex(table, &s, &bad_extra, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    }
    for (double v : bad_bounds) {
        bad_extra = extra;
        bad_extra.online_bound = v;
        EXPECT(sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    }
    for (double v : bad_priors) {
        bad_extra = extra;
        bad_extra.online_prior = v;
        EXPECT(sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    }
    if (policy != nullptr) { std::printf("FAIL a refused create left a policy\n"); ++failures; }
    bad_extra = extra;
    bad_extra.online_rate = -0.1;
    if (std::strstr((sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), sc_last_error()),
                    "extra->online_rate") == nullptr) {
        std::printf("FAIL the message does not name extra->online_rate: %s\n", sc_last_error());
        ++failures;
    }
    bad_extra = extra;
    bad_extra.size = 0;
    EXPECT(sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    bad_extra.size = sizeof(sc_policy_extra) + 8;  // a newer header's
    EXPECT(sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), SC_ERR_UNSUPPORTED);
    bad_extra = extra;
    bad_extra.size = offsetof(sc_policy_extra, online_bound);  // an older header's: the rest default
    bad_extra.online_bound = NAN;
    bad_extra.online_prior = NAN;
    EXPECT(sc_policy_create_ex(table, &online, &bad_extra, 10, 2, 100, &policy), SC_OK);
    sc_policy_destroy(policy);
    EXPECT(sc_policy_create_ex(table, &online, nullptr, 10, 2, 100, &policy), SC_OK);  // NULL: the defaults
    sc_policy_destroy(policy);
    sc_policy* plain = nullptr;
    EXPECT(sc_policy_create(table, &s, 10, 2, 100, &plain), SC_OK);
    const double errors[2] = {1.0, NAN};
    double factor[2] = {0, 0};
    const auto expect_factor = [&](bool ok, const char* when) {
        if (!ok) {
            std::printf("FAIL factor %s: %g %g\n", when, factor[0], factor[1]);
            ++failures;
        }
    };
    EXPECT(sc_policy_decide(plain, 0, 1000.0, nullptr, run, 2), SC_OK);
    EXPECT(sc_policy_observe(plain, 0, errors, 2), SC_ERR_INVALID_ARGUMENT);  // sencache does not learn
    EXPECT(sc_policy_factor(plain, factor, 2), SC_ERR_INVALID_ARGUMENT);
    sc_policy_destroy(plain);
    EXPECT(sc_policy_create_ex(table, &online, &extra, 10, 2, 100, &policy), SC_OK);
    EXPECT(sc_policy_observe(nullptr, 0, errors, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_observe(policy, 0, errors, 2), SC_ERR_STATE);  // nothing decided yet
    EXPECT(sc_policy_decide(policy, 0, 1000.0, nullptr, run, 2), SC_OK);
    EXPECT(sc_policy_observe(policy, 1, errors, 2), SC_ERR_STATE);  // not the step just decided
    EXPECT(sc_policy_observe(policy, 0, nullptr, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_observe(policy, 0, errors, 3), SC_ERR_BUFFER_SIZE);
    EXPECT(sc_policy_observe(policy, 0, errors, 2), SC_OK);  // a forced step predicts nothing: no change
    EXPECT(sc_policy_factor(policy, nullptr, 2), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_factor(policy, factor, 1), SC_ERR_BUFFER_SIZE);
    EXPECT(sc_policy_factor(policy, factor, 2), SC_OK);
    expect_factor(factor[0] == 1.0 && factor[1] == 1.0, "after a forced step");
    EXPECT(sc_policy_decide(policy, 1, 900.0, drift, run, 2), SC_OK);
    EXPECT(sc_policy_observe(policy, 1, errors, 2), SC_OK);
    EXPECT(sc_policy_factor(policy, factor, 2), SC_OK);
    expect_factor(factor[0] != 1.0 && factor[1] == 1.0, "after learning from sample 0 alone");
    EXPECT(sc_policy_reset(policy), SC_OK);
    EXPECT(sc_policy_observe(policy, 1, errors, 2), SC_ERR_STATE);  // a new request: nothing decided
    EXPECT(sc_policy_factor(policy, factor, 2), SC_OK);
    expect_factor(factor[0] == 1.0 && factor[1] == 1.0, "after reset");
    sc_policy_destroy(policy);
    sc_table_destroy(table);
    // NFE budgets (ABI 4): corrupt curves, nulls, fields out of range, a table without curves
    const std::string curves = R"("budget": {"format": "sencache-budget/1", "steps": [10, 20],
        "eps_grid": [0.0, 0.1, 0.2, 0.4], "fractions": [[1.0, 0.8, 0.6, 0.5], [1.0, 0.6, 0.4, 0.3]],
        "profiles": [[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
                     [0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
                      0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]],
        "eps_ratio": 0.25, "max_reuse": 3, "switch_frac": 0.2, "force_last": true)";
    const std::string with_curves = good.substr(0, good.rfind('}')) + ", " + curves + "}}";
    const std::string corrupt_curves[] = {
        good.substr(0, good.rfind('}')) + R"(, "budget": 3})",
        good.substr(0, good.rfind('}')) + R"(, "budget": {"format": "sencache-budget/1"}})",
        good.substr(0, good.rfind('}')) + ", " + curves + R"(, "online": {"steps": 10}}})",
        good.substr(0, good.rfind('}')) + ", " + curves.substr(0, curves.find("\"steps\"")) +
            R"("steps": [20, 10], )" + curves.substr(curves.find("\"eps_grid\"")) + "}}",
    };
    for (const std::string& text : corrupt_curves)
        EXPECT(sc_table_parse_json(text.data(), text.size(), &table), SC_ERR_CORRUPT);
    EXPECT(sc_table_parse_json(with_curves.data(), with_curves.size(), &table), SC_OK);
    if (sc_table_has_budget(table) != 1 || sc_table_has_budget(nullptr) != 0) {
        std::printf("FAIL sc_table_has_budget\n");
        ++failures;
    }
    sc_budget budget = {sizeof(sc_budget), SC_BUDGET_NFE, SC_BUDGET_HARD, 6.0, SC_SPEED_BALANCED};
    EXPECT(sc_policy_create_budget(nullptr, SC_RULE_SENCACHE, nullptr, &budget, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, nullptr, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &budget, 10, 2, 100, nullptr),
           SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE_MAX, nullptr, &budget, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create_budget(table, static_cast<sc_rule>(7), nullptr, &budget, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    // sencache-plan (ABI 5): this table has no reuse costs; a plain policy is never the plan
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE_PLAN, nullptr, &budget, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    sc_policy_settings plan_settings = {SC_RULE_SENCACHE_PLAN, 0.1, 0.1, 3, 0.2, 1};
    EXPECT(sc_policy_create(table, &plan_settings, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &budget, 1001, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &budget, 10, 0, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    const double bad_values[] = {0.0, 2.5, 11.0, 1001.0, NAN, INFINITY, -1.0};  // 11 of 10 steps: too many
    for (double v : bad_values) {
        sc_budget b = budget;
        b.value = v;
        EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy),
               SC_ERR_INVALID_ARGUMENT);
    }
    sc_budget b = budget;
    b.kind = SC_BUDGET_SPEEDUP;
    b.value = 0.5;
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    b = budget;
    b.kind = static_cast<sc_budget_kind>(5);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    b = budget;
    b.mode = static_cast<sc_budget_mode>(5);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    b = budget;
    b.kind = SC_BUDGET_SPEED;
    b.speed = static_cast<sc_budget_speed>(9);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    b = budget;
    b.size = sizeof(sc_budget) + 8;
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy), SC_ERR_UNSUPPORTED);
    b = budget;
    b.mode = SC_BUDGET_THRESHOLD;
    b.value = 2.0;  // fewer runs than the threshold rule reaches at 10 steps
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &b, 10, 2, 100, &policy), SC_ERR_INVALID_ARGUMENT);
    if (std::strstr(sc_last_error(), "ask for budget hard") == nullptr) {
        std::printf("FAIL the message does not say to ask for budget hard: %s\n", sc_last_error());
        ++failures;
    }
    bad_extra = extra;
    bad_extra.online_bound = 0.5;
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE_ONLINE, &bad_extra, &budget, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);
    if (policy != nullptr) { std::printf("FAIL a refused budget left a policy\n"); ++failures; }
    // a hard budget at the most steps, run through (the plan's table: 1000 x 1001), then reset
    b = budget;
    b.value = 400.0;
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE_ONLINE, nullptr, &b, 1000, 2, 100, &policy), SC_OK);
    double eps_main = 0;
    int32_t nfe = 0;
    EXPECT(sc_policy_budget(policy, nullptr, &eps_main, &nfe), SC_OK);
    if (!(std::isnan(eps_main) && nfe == 400)) {
        std::printf("FAIL sc_policy_budget %g %d\n", eps_main, nfe);
        ++failures;
    }
    int runs[2] = {0, 0};
    for (int round = 0; round < 2; ++round) {
        for (int step = 0; step < 1000; ++step) {
            EXPECT(sc_policy_decide(policy, step, 1000.0 - step, drift, run, 2), SC_OK);
            runs[0] += run[0];
            runs[1] += run[1];
        }
        if (runs[0] != 400 || runs[1] != 400) {
            std::printf("FAIL hard budget ran %d %d\n", runs[0], runs[1]);
            ++failures;
        }
        runs[0] = runs[1] = 0;
        EXPECT(sc_policy_reset(policy), SC_OK);
    }
    EXPECT(sc_policy_budget(nullptr, nullptr, nullptr, nullptr), SC_ERR_INVALID_ARGUMENT);
    sc_policy_destroy(policy);
    EXPECT(sc_policy_create(table, &s, 10, 2, 100, &plain), SC_OK);
    EXPECT(sc_policy_budget(plain, nullptr, nullptr, nullptr), SC_ERR_INVALID_ARGUMENT);  // made without one
    sc_policy_destroy(plain);
    sc_table_destroy(table);
    EXPECT(sc_table_parse_json(good.data(), good.size(), &table), SC_OK);
    EXPECT(sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &budget, 10, 2, 100, &policy),
           SC_ERR_INVALID_ARGUMENT);  // no curves
    sc_table_destroy(table);
    if (sc_abi_version() != SC_ABI_VERSION) { std::printf("FAIL sc_abi_version %d\n", sc_abi_version()); ++failures; }
    // without CUDA every sc_drift_* call says so; with it, bad arguments are refused before the device
    sc_drift* drift_handle = nullptr;
    EXPECT(sc_drift_create(0, 10, &drift_handle), sc_drift_available() ? SC_ERR_INVALID_ARGUMENT : SC_ERR_UNSUPPORTED);
    EXPECT(sc_drift_wait(nullptr, nullptr, 1), sc_drift_available() ? SC_ERR_INVALID_ARGUMENT : SC_ERR_UNSUPPORTED);
    sc_drift_destroy(nullptr);
    if (std::strcmp(sc_status_name(static_cast<sc_status>(99)), "SC_ERR_UNKNOWN_STATUS") != 0) ++failures;
    std::printf("%s: %d failures\n", failures ? "FAILED" : "passed", failures);
    return failures ? 1 : 0;
}
