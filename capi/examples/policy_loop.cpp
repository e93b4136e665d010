// The cache alone around a denoiser loop of the host's own: per step, the drift in, the native
// rule (sc_policy_*) decides, the run mask out. The denoiser here is a stand-in driven through
// Python (stand_in_denoiser.py: the bundle's ONNX stages); a real host calls its own engines and
// the drift kernel (sc_drift_*) instead, and needs no Python at all.
// With NFE, the rule is held to a hard budget of NFE runs (sc_policy_create_budget, ABI 4).
//   policy_loop BUNDLE_DIR EXAMPLES_DIR OUT_DIR STEPS PROMPT SEED [NFE]
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "sencache.h"

#ifndef SENCACHE_DEFAULT_PYTHON
#define SENCACHE_DEFAULT_PYTHON ""
#endif

static int python_failed(const char* what) {
    std::fprintf(stderr, "%s failed:\n", what);
    PyErr_Print();
    return 1;
}

int main(int argc, char** argv) {
    if (argc < 7) {
        std::fprintf(stderr, "usage: %s BUNDLE_DIR EXAMPLES_DIR OUT_DIR STEPS PROMPT SEED [NFE]\n", argv[0]);
        return 2;
    }
    const char* bundle = argv[1];
    const int steps = std::atoi(argv[4]);

    // the native rule: the bundle's table and default settings
    sc_table* table = nullptr;
    sc_policy_settings settings;
    if (sc_table_load_bundle(bundle, &table) != SC_OK || sc_policy_settings_from_bundle(bundle, &settings) != SC_OK) {
        std::fprintf(stderr, "sencache: %s\n", sc_last_error());
        return 1;
    }

    // the stand-in denoiser
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    const char* env = std::getenv("SENCACHE_PYTHON");
    const char* python = env && *env ? env : SENCACHE_DEFAULT_PYTHON;
    if (*python) PyConfig_SetBytesString(&config, &config.program_name, python);
    const PyStatus started = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(started)) return 1;
    PyObject* path = PySys_GetObject("path");
    PyObject* examples = PyUnicode_FromString(argv[2]);
    PyList_Insert(path, 0, examples);
    Py_DECREF(examples);
    PyObject* module = PyImport_ImportModule("stand_in_denoiser");
    if (!module) return python_failed("import stand_in_denoiser");
    PyObject* denoiser = PyObject_CallMethod(module, "Denoiser", "ssii", bundle, argv[5], std::atoi(argv[6]), steps);
    if (!denoiser) return python_failed("Denoiser");
    PyObject* numel = PyObject_GetAttrString(denoiser, "numel");

    sc_policy* policy = nullptr;
    const int64_t size = PyLong_AsLongLong(numel);
    sc_status made;
    if (argc > 7) {  // the budget chooses the thresholds from the bundle's calibrated curves
        const sc_budget budget = {sizeof(sc_budget), SC_BUDGET_NFE, SC_BUDGET_HARD, std::atof(argv[7]),
                                  SC_SPEED_BALANCED};
        made = sc_policy_create_budget(table, SC_RULE_SENCACHE, nullptr, &budget, steps, 1, size, &policy);
    } else {
        made = sc_policy_create(table, &settings, steps, 1, size, &policy);
    }
    if (made != SC_OK) {
        std::fprintf(stderr, "sencache: %s\n", sc_last_error());
        return 1;
    }
    Py_DECREF(numel);
    sc_table_destroy(table);

    std::string decisions;
    int nfe = 0;
    while (true) {
        PyObject* asked = PyObject_CallMethod(denoiser, "ask", nullptr);
        if (!asked) return python_failed("ask");
        if (asked == Py_None) {
            Py_DECREF(asked);
            break;
        }
        int step = 0;
        double t = 0;
        PyObject* drift = nullptr;
        if (!PyArg_ParseTuple(asked, "idO", &step, &t, &drift)) return python_failed("ask's answer");
        const float* drift_sumsq = drift == Py_None ? nullptr : reinterpret_cast<const float*>(PyBytes_AsString(drift));
        uint8_t run[1];
        if (sc_policy_decide(policy, step, t, drift_sumsq, run, 1) != SC_OK) {
            std::fprintf(stderr, "sencache: step %d: %s\n", step, sc_last_error());
            return 1;
        }
        Py_DECREF(asked);
        PyObject* done = PyObject_CallMethod(denoiser, "answer", "y#", reinterpret_cast<const char*>(run), Py_ssize_t{1});
        if (!done) return python_failed("answer");
        Py_DECREF(done);
        decisions += run[0] ? 'R' : '.';
        nfe += run[0];
    }
    sc_policy_destroy(policy);
    PyObject* saved = PyObject_CallMethod(denoiser, "save", "s", argv[3]);
    if (!saved) return python_failed("save");
    std::printf("decisions %s (R: run, .: reuse), NFE %d of %d\n", decisions.c_str(), nfe, steps);
    Py_DECREF(saved);
    Py_DECREF(denoiser);
    Py_DECREF(module);
    return 0;  // the interpreter is not finalised: torch's threads may still hold it
}
