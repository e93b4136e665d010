// See budget.hpp. Build with -ffp-contract=off (as policy.cpp): NumPy does not fuse.
#include "budget.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace sencache::budget {

namespace {

using json::Value;
constexpr double kInf = std::numeric_limits<double>::infinity();
const char* const kFormat = "sencache-budget/1";

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

const Value& member(const Value& object, const char* key) {
    const Value* v = object.find(key);
    if (v == nullptr) fail(std::string("missing '") + key + "'");
    return *v;
}

const std::vector<Value>& list(const Value& v) {
    if (v.kind != Value::Array) fail("expected a list");
    return v.items;
}

double number(const Value& v) {
    if (v.kind != Value::Number) fail("expected a number");
    return v.number;
}

// An integer as JSON writes Python's int (the reader keeps no int/float distinction: an integral
// value is taken).
int64_t integer(const Value& v) {
    const double x = number(v);
    if (!(std::floor(x) == x && std::fabs(x) < 9.0e15)) fail("expected an integer");
    return static_cast<int64_t>(x);
}

std::vector<double> vector(const Value& v) {
    if (v.kind != Value::Array) fail("tables must be lists of numbers");
    std::vector<double> out;
    for (const Value& item : v.items) {
        if (item.kind != Value::Number) fail("tables must be lists of numbers");
        out.push_back(item.number);
    }
    return out;
}

// _check_axes
void check_axes(const std::vector<int64_t>& steps, const std::vector<double>& grid) {
    if (steps.empty()) fail("steps must be increasing");
    for (size_t i = 1; i < steps.size(); ++i)
        if (steps[i] <= steps[i - 1]) fail("steps must be increasing");
    for (int64_t s : steps)
        if (s < 2) fail("steps must be at least 2");
    bool ok = grid.size() >= 2 && grid[0] >= 0;
    for (size_t i = 0; ok && i < grid.size(); ++i) ok = std::isfinite(grid[i]) && (i == 0 || grid[i] - grid[i - 1] > 0);
    if (!ok) fail("eps_grid must be finite, non-negative and increasing");
}

// fractions in (0, 1], one per eps, not growing with eps (by more than 1e-9); `count` and `growth`
// word the two faults
void check_fractions(const std::vector<double>& fractions, size_t grid, const char* count, const char* growth) {
    bool ok = fractions.size() == grid;
    for (size_t i = 0; ok && i < fractions.size(); ++i) ok = fractions[i] > 0 && fractions[i] <= 1;
    if (!ok) fail(count);
    for (size_t i = 1; i < fractions.size(); ++i)
        if (fractions[i] - fractions[i - 1] > 1e-9) fail(growth);
}

OnlineCurve parse_online(const Value& doc) {
    if (doc.kind != Value::Object) fail("the online curve must be an object");
    OnlineCurve c;
    c.steps = integer(member(doc, "steps"));
    c.eps_grid = vector(member(doc, "eps_grid"));
    c.fractions = vector(member(doc, "fractions"));
    c.rate = number(member(doc, "rate"));
    c.bound = number(member(doc, "bound"));
    c.prior = number(member(doc, "prior"));
    check_axes({c.steps}, c.eps_grid);
    check_fractions(c.fractions, c.eps_grid.size(), "the online curve must hold one fraction in (0, 1] per eps",
                    "the online curve's fractions must not grow with eps");
    return c;
}

// The rows of a square matrix of the reuse costs, appended to `out`; whether they were `steps` of
// `steps` values each
bool matrix_rows(const Value& doc, int64_t steps, std::vector<double>& out) {
    const std::vector<Value>& rows = list(doc);
    bool square = static_cast<int64_t>(rows.size()) == steps;
    for (const Value& row : rows) {
        const std::vector<double> values = vector(row);
        square = square && static_cast<int64_t>(values.size()) == steps;
        out.insert(out.end(), values.begin(), values.end());
    }
    return square;
}

// ReuseCosts.__post_init__ for one of its matrices, `name` wording the faults
void check_matrix(const std::vector<double>& m, int64_t steps, bool square, const std::string& name) {
    if (steps < 2 || !square)
        fail("the " + name + " must be a " + std::to_string(steps) + " x " + std::to_string(steps) +
             " matrix of at least 2 steps");
    for (int64_t a = 0; a < steps; ++a)
        for (int64_t i = 0; i < steps; ++i) {
            const double v = m[a * steps + i];
            if (!std::isfinite(v) || v < 0 || (i <= a && v != 0))
                fail("the " + name + " must be finite, non-negative, and 0 on and below the diagonal");
        }
}

// ReuseCosts.from_dict and its checks
Costs parse_costs(const Value& doc) {
    if (doc.kind != Value::Object) fail("the reuse costs must be an object");
    Costs c;
    c.steps = integer(member(doc, "steps"));
    const bool square = matrix_rows(member(doc, "cost"), c.steps, c.cost);
    const Value* scores = doc.find("score_sq");
    const bool scored = scores != nullptr && scores->kind != Value::Null;
    const bool scores_square = scored && matrix_rows(*scores, c.steps, c.score_sq);
    check_matrix(c.cost, c.steps, square, "reuse costs");
    if (scored) check_matrix(c.score_sq, c.steps, scores_square, "mean squared scores");
    const Value* errors = doc.find("error_sq");
    if (errors != nullptr && errors->kind != Value::Null) {
        const std::vector<Value>& rows = list(*errors);
        bool shaped = static_cast<int64_t>(rows.size()) == c.steps;
        for (const Value& row : rows) {
            const std::vector<double> values = vector(row);
            if (c.error_sq.empty()) c.error_depth = static_cast<int64_t>(values.size());
            shaped = shaped && c.error_depth >= 1 && static_cast<int64_t>(values.size()) == c.error_depth;
            c.error_sq.insert(c.error_sq.end(), values.begin(), values.end());
        }
        if (!shaped) fail("the mean observed reuse errors must be a " + std::to_string(c.steps) + " x depth matrix");
        for (const double v : c.error_sq)
            if (!std::isfinite(v) || v < 0) fail("the mean observed reuse errors must be finite and non-negative");
    }
    return c;
}

std::vector<double> minimum_accumulate(std::vector<double> v) {
    for (size_t i = 1; i < v.size(); ++i) v[i] = v[i] < v[i - 1] ? v[i] : v[i - 1];
    return v;
}

// np.linspace(0.0, 1.0, num): i * (1 / (num - 1)), the last exactly 1
std::vector<double> unit_linspace(int64_t num) {
    std::vector<double> y(static_cast<size_t>(num));
    const double step = num > 1 ? 1.0 / static_cast<double>(num - 1) : 0.0;
    for (int64_t i = 0; i < num; ++i) y[i] = num > 1 ? static_cast<double>(i) * step + 0.0 : 0.0;
    if (num > 1) y.back() = 1.0;
    return y;
}

}  // namespace

Curves parse(const Value& doc) {
    const Value* format = doc.kind == Value::Object ? doc.find("format") : nullptr;
    if (format == nullptr || format->kind != Value::String || format->text != kFormat)
        fail(std::string("not ") + kFormat + " curves");
    Curves c;
    for (const Value& v : list(member(doc, "steps"))) c.steps.push_back(integer(v));
    c.eps_grid = vector(member(doc, "eps_grid"));
    for (const Value& row : list(member(doc, "fractions"))) c.fractions.push_back(vector(row));
    for (const Value& row : list(member(doc, "profiles"))) c.profiles.push_back(vector(row));
    c.eps_ratio = number(member(doc, "eps_ratio"));
    c.max_reuse = integer(member(doc, "max_reuse"));
    c.switch_frac = number(member(doc, "switch_frac"));
    const Value& force_last = member(doc, "force_last");
    if (force_last.kind != Value::Bool) fail("expected true or false");
    c.force_last = force_last.boolean;
    const Value* online = doc.find("online");
    if (online != nullptr && online->kind != Value::Null) c.online = parse_online(*online);
    const Value* costs = doc.find("costs");
    if (costs != nullptr && costs->kind != Value::Null) c.costs = parse_costs(*costs);
    // BudgetCurves.__post_init__
    check_axes(c.steps, c.eps_grid);
    if (c.fractions.size() != c.steps.size() || c.profiles.size() != c.steps.size())
        fail("fractions and profiles need one row per step count");
    for (size_t n = 0; n < c.steps.size(); ++n) {
        check_fractions(c.fractions[n], c.eps_grid.size(), "each fractions row must hold one fraction in (0, 1] per eps",
                        "fractions must not grow with eps");
        const std::vector<double>& profile = c.profiles[n];
        bool ok = static_cast<int64_t>(profile.size()) == c.steps[n];
        for (size_t i = 0; ok && i < profile.size(); ++i) ok = std::isfinite(profile[i]) && profile[i] >= 0;
        if (!ok) fail("each profile must hold one finite non-negative score per step");
    }
    if (!(std::isfinite(c.eps_ratio) && c.eps_ratio >= 0)) fail("eps_ratio must be a finite non-negative number");
    if (c.max_reuse < 0 || !(c.switch_frac >= 0 && c.switch_frac <= 1))
        fail("max_reuse and switch_frac are out of range");
    return c;
}

double interp(double x, const std::vector<double>& xp, const std::vector<double>& fp) {
    // numpy's search finds the last j with xp[j] <= x, whatever its guess: upper_bound - 1
    const size_t n = xp.size();
    if (std::isnan(x)) return x;
    if (x < xp[0]) return fp[0];
    if (x > xp[n - 1]) return fp[n - 1];
    const size_t j = static_cast<size_t>(std::upper_bound(xp.begin(), xp.end(), x) - xp.begin()) - 1;
    if (j == n - 1) return fp[j];
    if (xp[j] == x) return fp[j];
    const double slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    double r = slope * (x - xp[j]) + fp[j];
    if (std::isnan(r)) {
        r = slope * (x - xp[j + 1]) + fp[j + 1];
        if (std::isnan(r) && fp[j] == fp[j + 1]) r = fp[j];
    }
    return r;
}

std::vector<double> fraction_curve(const Curves& curves, int32_t steps) {
    std::vector<double> recorded;
    for (int64_t s : curves.steps) recorded.push_back(std::log(static_cast<double>(s)));
    const double at = std::log(static_cast<double>(steps));
    std::vector<double> curve, column(curves.steps.size());
    for (size_t g = 0; g < curves.eps_grid.size(); ++g) {
        for (size_t n = 0; n < curves.steps.size(); ++n) column[n] = curves.fractions[n][g];
        curve.push_back(interp(at, recorded, column));
    }
    return minimum_accumulate(curve);
}

std::optional<double> eps_for_fraction(const Curves& curves, int32_t steps, double fraction) {
    const std::vector<double> curve = fraction_curve(curves, steps);
    if (fraction < curve.back() - 1e-9) return std::nullopt;
    if (fraction >= curve.front()) return curves.eps_grid.front();
    const std::vector<double> rising(curve.rbegin(), curve.rend());
    const std::vector<double> grid(curves.eps_grid.rbegin(), curves.eps_grid.rend());
    return interp(fraction, rising, grid);
}

std::vector<double> step_profile(const Curves& curves, int32_t steps) {
    size_t nearest = 0;
    double best = kInf;
    for (size_t n = 0; n < curves.steps.size(); ++n) {
        const double distance = std::fabs(std::log(static_cast<double>(curves.steps[n]) / static_cast<double>(steps)));
        if (distance < best) {  // np.argmin: the first of equals
            best = distance;
            nearest = n;
        }
    }
    const int64_t recorded = curves.steps[nearest];
    const std::vector<double>& profile = curves.profiles[nearest];
    if (steps == recorded) return profile;
    const std::vector<double> place = unit_linspace(steps), grid = unit_linspace(recorded);
    const double ratio = static_cast<double>(recorded - 1), span = static_cast<double>(std::max(steps - 1, 1));
    std::vector<double> out;
    for (double p : place) out.push_back(interp(p, grid, profile) * ratio / span);
    return out;
}

std::optional<double> online_eps_for_fraction(const Curves& curves, int32_t steps, double fraction) {
    const OnlineCurve& online = *curves.online;
    const std::vector<double>& measured = online.fractions;
    if (!(measured.back() - 1e-9 <= fraction && fraction <= measured.front() + 1e-9)) return std::nullopt;
    const std::vector<double> rising(measured.rbegin(), measured.rend());
    std::vector<double> logs;
    for (auto it = online.eps_grid.rbegin(); it != online.eps_grid.rend(); ++it) logs.push_back(std::log(*it));
    const double eps = std::exp(interp(fraction, rising, logs));
    const std::optional<double> there = eps_for_fraction(curves, static_cast<int32_t>(online.steps), fraction);
    const std::optional<double> here = eps_for_fraction(curves, steps, fraction);
    if (steps == online.steps || !there || *there == 0 || !here) return eps;
    return eps * *here / *there;
}

std::vector<double> run_thresholds(const std::vector<double>& profile, const std::vector<bool>& forced) {
    const size_t steps = profile.size(), width = steps + 1;
    std::vector<size_t> next_forced(steps, steps);
    for (size_t p = steps - 1; p-- > 0;) next_forced[p] = forced[p + 1] ? p + 1 : next_forced[p + 1];
    // blocks[p][k]: the largest smallest sum of k blocks after step p (inf for none, -inf where k do not fit)
    std::vector<double> blocks(steps * width, -kInf), best(steps), sums;
    for (size_t p = 0; p < steps; ++p) blocks[p * width] = kInf;
    for (size_t p = steps - 1; p-- > 0;) {
        const size_t end = next_forced[p];
        sums.clear();
        for (size_t q = p + 1; q < end; ++q)  // np.cumsum: the first element itself, then in order
            sums.push_back(sums.empty() ? profile[q] : sums.back() + profile[q]);
        std::fill(best.begin(), best.end(), -kInf);
        for (size_t j = 0; j < sums.size(); ++j) {
            const double* row = &blocks[(p + 1 + j) * width];
            for (size_t k = 0; k < steps; ++k) {
                const double m = sums[j] < row[k] ? sums[j] : row[k];
                if (m > best[k]) best[k] = m;
            }
        }
        double* out = &blocks[p * width + 1];
        for (size_t k = 0; k < steps; ++k) {
            const double later = end == steps ? -kInf : blocks[end * width + 1 + k];
            out[k] = end == steps ? best[k] : (best[k] < later ? later : best[k]);
        }
    }
    std::vector<double> thresholds(steps * width, -kInf);
    for (size_t i = 0; i < steps; ++i) {
        if (forced[i]) continue;
        const size_t end = next_forced[i];
        size_t positive = end;
        for (size_t q = i + 1; q < end && positive == end; ++q)
            if (profile[q] > 0) positive = q;
        double* out = &thresholds[i * width + 1];
        if (positive < end) {
            std::copy_n(&blocks[positive * width], steps, out);
        } else if (end < steps) {
            std::copy_n(&blocks[end * width + 1], steps, out);
        }
    }
    return thresholds;
}

Plan::Plan(int32_t nfe_, bool capped_, const std::vector<bool>& forced, const std::vector<double>& profile)
    : nfe(nfe_), capped(capped_) {
    const size_t steps = forced.size();
    forced_after.assign(steps, 0);
    free_from.assign(steps, 0);
    for (size_t i = steps; i-- > 0;) {
        forced_after[i] = i + 1 < steps ? forced_after[i + 1] + (forced[i + 1] ? 1 : 0) : 0;
        free_from[i] = (i + 1 < steps ? free_from[i + 1] : 0) + (forced[i] ? 0 : 1);
    }
    thresholds = run_thresholds(profile, forced);
}

bool Plan::runs(int32_t step, size_t b, double score, int64_t reuses, int32_t max_reuse) const {
    const int64_t left = nfe - spent[b] - forced_after[step];
    if (left >= free_from[step] || (capped && reuses >= max_reuse)) return true;
    return left > 0 && score >= thresholds[static_cast<size_t>(step) * (forced_after.size() + 1) + left];
}

namespace {

// _at_steps: an upper-triangular [a][i] matrix measured at `measured` steps, at `steps` steps
std::vector<double> at_steps(const std::vector<double>& matrix, int64_t measured, int32_t steps) {
    const size_t n = static_cast<size_t>(measured), m = static_cast<size_t>(steps);
    if (static_cast<int64_t>(steps) == measured) return matrix;
    const std::vector<double> grid = unit_linspace(measured), at = unit_linspace(steps);
    // rows: each measured row read at the new fractions; then each column of those
    std::vector<double> rows(n * m), out(m * m, 0.0), column(n), row(n);
    for (size_t a = 0; a < n; ++a) {
        for (size_t i = 0; i < n; ++i) row[i] = matrix[a * n + i];
        for (size_t j = 0; j < m; ++j) rows[a * m + j] = interp(at[j], grid, row);
    }
    for (size_t j = 0; j < m; ++j) {
        for (size_t a = 0; a < n; ++a) column[a] = rows[a * m + j];
        for (size_t b = 0; b < m; ++b)
            if (j > b) out[b * m + j] = interp(at[b], grid, column);  // np.triu(k=1)
    }
    return out;
}

// _gaps: gap[a * (steps + 1) + m], the cost of reusing steps a+1 .. m-1 from anchor a
std::vector<double> gaps(const std::vector<double>& cost, const std::vector<bool>& forced, int64_t max_reuse) {
    const int64_t steps = static_cast<int64_t>(forced.size());
    const size_t width = static_cast<size_t>(steps + 1);
    std::vector<double> gap(static_cast<size_t>(steps) * width, kInf);
    for (int64_t a = 0; a < steps; ++a) {
        double total = 0.0;
        for (int64_t m = a + 1; m <= std::min(steps, a + 1 + max_reuse); ++m) {
            gap[a * width + m] = total;
            if (m == steps || forced[m]) break;
            total += cost[a * steps + m];
        }
    }
    return gap;
}

// _after
double after(const std::vector<double>& later, int64_t steps, int32_t runs, int64_t m, int64_t left) {
    if (m == steps) return left == 0 ? 0.0 : kInf;
    return left > 0 ? later[m * (runs + 1) + left - 1] : kInf;
}

}  // namespace

std::vector<double> costs_at(const Costs& costs, int32_t steps) { return at_steps(costs.cost, costs.steps, steps); }

std::vector<double> scores_at(const Costs& costs, int32_t steps) {
    return costs.score_sq.empty() ? std::vector<double>{} : at_steps(costs.score_sq, costs.steps, steps);
}

std::vector<double> later_costs(const std::vector<double>& cost, int32_t runs, const std::vector<bool>& forced,
                                int64_t max_reuse) {
    const int64_t steps = static_cast<int64_t>(forced.size());
    const size_t width = static_cast<size_t>(steps + 1), k = static_cast<size_t>(runs) + 1;
    const std::vector<double> gap = gaps(cost, forced, max_reuse);
    std::vector<double> later(static_cast<size_t>(steps) * k, kInf);
    for (int64_t m = 0; m < steps; ++m) later[m * k] = gap[m * width + steps];
    for (size_t r = 1; r < k; ++r)
        for (int64_t m = 0; m < steps; ++m) {  // the least over the next run n (gap is inf past these)
            double low = kInf;
            for (int64_t n = m + 1; n <= std::min(steps - 1, m + 1 + max_reuse); ++n) {
                const double c = gap[m * width + n] + later[n * k + r - 1];
                if (c < low) low = c;
            }
            later[m * k + r] = low;
        }
    return later;
}

bool runs_now(const double* row, const std::vector<double>& later, int32_t runs, const std::vector<bool>& forced,
              int64_t step, int64_t anchor, int64_t left, int64_t max_reuse, double scale) {
    const int64_t steps = static_cast<int64_t>(forced.size());
    const double now = after(later, steps, runs, step, left);
    double total = 0.0;
    for (int64_t m = step + 1; m <= std::min(steps, anchor + 1 + max_reuse); ++m) {
        if (forced[m - 1]) break;
        total += scale * row[m - 1];
        if (total + after(later, steps, runs, m, left) < now) return false;
    }
    if (!std::isfinite(now))
        throw std::logic_error("no plan of " + std::to_string(left) + " runs from step " + std::to_string(step) +
                               " (anchor " + std::to_string(anchor) + "): the budget's plan is broken");
    return true;
}

double drift_scale(double score, double mean_sq) {
    const double ratio = mean_sq > 0 ? score * score / mean_sq : std::numeric_limits<double>::quiet_NaN();
    return std::isfinite(ratio * ratio) ? ratio * ratio : 1.0;
}

std::optional<std::vector<bool>> plan_schedule(const std::vector<double>& cost, int32_t runs,
                                               const std::vector<bool>& forced, int64_t max_reuse) {
    const int64_t steps = static_cast<int64_t>(forced.size());
    const size_t width = static_cast<size_t>(steps + 1), k = static_cast<size_t>(runs) + 1;
    const std::vector<double> gap = gaps(cost, forced, max_reuse);
    std::vector<double> best(static_cast<size_t>(steps) * k, kInf);
    std::vector<int64_t> back(static_cast<size_t>(steps) * k, 0);
    best[1] = 0.0;
    for (int64_t m = 1; m < steps; ++m)
        for (size_t r = 1; r < k; ++r) {  // np.argmin over anchors: the first smallest
            double low = kInf;
            int64_t at = 0;
            bool seen = false;
            for (int64_t a = 0; a < m; ++a) {
                const double c = best[a * k + r - 1] + gap[a * width + m];
                if (!seen || c < low) low = c, at = a, seen = true;
            }
            best[m * k + r] = low;
            back[m * k + r] = at;
        }
    double low = kInf;
    int64_t last = 0;
    for (int64_t m = 0; m < steps; ++m) {
        const double c = best[m * k + runs] + gap[m * width + steps];
        if (m == 0 || c < low) low = c, last = m;
    }
    if (!std::isfinite(low)) return std::nullopt;
    std::vector<bool> schedule(static_cast<size_t>(steps), false);
    for (int64_t m = last, r = runs;; m = back[m * k + r], --r) {
        schedule[m] = true;
        if (m == 0) break;
    }
    return schedule;
}

}  // namespace sencache::budget
