// NFE budgets, native: the budget curves a sensitivity table carries (runtime/sensitivity.py
// BudgetCurves, OnlineCurve, ReuseCosts) and the pure arithmetic that turns a budget into a rule
// (runtime/cache/budget.py: fraction_curve, eps_for_fraction, step_profile, run_thresholds,
// online_eps_for_fraction; runtime/cache/plan.py: costs_at, plan_schedule), in double, operation
// for operation, so the results agree bit for bit.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "json.hpp"

namespace sencache::budget {

// sencache-online's measured mean NFE / steps against its eps_main (OnlineCurve).
struct OnlineCurve {
    int64_t steps = 0;
    std::vector<double> eps_grid, fractions;
    double rate = 0, bound = 0, prior = 0;
};

// sencache-plan's reuse costs (ReuseCosts): cost[a * steps + i], 0 where a >= i; score_sq the
// calibration's mean squared scores, laid out alike (empty: none, costs from before them).
struct Costs {
    int64_t steps = 0;
    std::vector<double> cost, score_sq;
    std::vector<double> error_sq;  // [steps][error_depth], row-major; empty: none (ReuseCosts.error_sq)
    int64_t error_depth = 0;
};

// What calibration records for NFE budgets (BudgetCurves).
struct Curves {
    std::vector<int64_t> steps;
    std::vector<double> eps_grid;
    std::vector<std::vector<double>> fractions, profiles;
    double eps_ratio = 0;
    int64_t max_reuse = 0;
    double switch_frac = 0;
    bool force_last = true;
    std::optional<OnlineCurve> online;
    std::optional<Costs> costs;
};

// BudgetCurves.from_dict and its checks; throws std::invalid_argument saying what is wrong.
Curves parse(const json::Value& document);

// numpy.interp for one x (numpy/_core/src/multiarray/compiled_base.c, arr_interp).
double interp(double x, const std::vector<double>& xp, const std::vector<double>& fp);

// fraction_curve: mean NFE / steps against eps_grid at `steps` steps.
std::vector<double> fraction_curve(const Curves& curves, int32_t steps);
// eps_for_fraction: the eps_main whose mean NFE / steps is `fraction`; nullopt past the curve.
std::optional<double> eps_for_fraction(const Curves& curves, int32_t steps, double fraction);
// step_profile: the expected one-step score of each of `steps` steps.
std::vector<double> step_profile(const Curves& curves, int32_t steps);
// online_eps_for_fraction: sencache-online's eps_main for `fraction`; nullopt outside its curve.
std::optional<double> online_eps_for_fraction(const Curves& curves, int32_t steps, double fraction);
// costs_at: the reuse costs at `steps` steps, row-major [steps][steps].
std::vector<double> costs_at(const Costs& costs, int32_t steps);
// scores_at: the mean squared scores at `steps` steps, as costs_at reads the costs; empty: none.
std::vector<double> scores_at(const Costs& costs, int32_t steps);
// later_costs: the least cost after a run at step m with r more runs, row-major [steps][runs + 1].
std::vector<double> later_costs(const std::vector<double>& cost, int32_t runs, const std::vector<bool>& forced,
                                int64_t max_reuse);
// runs_now: whether a sample runs `step` (not forced) from `anchor` with `left` runs, its anchor's
// costs `row` scaled by `scale`; throws std::logic_error where no plan is left (a broken plan).
bool runs_now(const double* row, const std::vector<double>& later, int32_t runs, const std::vector<bool>& forced,
              int64_t step, int64_t anchor, int64_t left, int64_t max_reuse, double scale);
// drift_scale: (score^2 / mean_sq)^2, 1 where that is not finite.
double drift_scale(double score, double mean_sq);
// plan_schedule: the cheapest schedule of `runs` runs (its run flags); nullopt where none exists.
std::optional<std::vector<bool>> plan_schedule(const std::vector<double>& cost, int32_t runs,
                                               const std::vector<bool>& forced, int64_t max_reuse);
// run_thresholds: the hard mode's plan, row-major [steps][steps + 1].
std::vector<double> run_thresholds(const std::vector<double>& profile, const std::vector<bool>& forced);

// The hard mode's plan of one request (SenCacheHardBudget; SenCacheOnlineBudget's step weights
// and, in its threshold mode, the max_reuse cap), from run_thresholds over the step profile.
struct Plan {
    int32_t nfe = 0;
    bool capped = false;
    std::vector<int64_t> forced_after, free_from;  // forced steps after i; free steps from i on
    std::vector<double> thresholds;                // [steps][steps + 1]
    std::vector<double> weights;                   // per step (sencache-online's plan); empty: none
    std::vector<int64_t> spent;                    // runs so far, per sample

    Plan(int32_t nfe, bool capped, const std::vector<bool>& forced, const std::vector<double>& profile);
    // SenCacheHardBudget.decide for sample b of a step that is not forced.
    bool runs(int32_t step, size_t b, double score, int64_t reuses, int32_t max_reuse) const;
};

}  // namespace sencache::budget
