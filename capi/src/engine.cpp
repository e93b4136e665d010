// sc_engine_*: the Python runtime's step engine behind the C ABI, through an embedded interpreter
// (capi/host.py does the Python side). Every call takes the GIL for its duration; an interpreter
// is started only when the process has none, and never finalised.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_set>
#include <vector>

#include "common.hpp"

using sencache::Error;
using sencache::guarded;

#ifndef SENCACHE_DEFAULT_PYTHON
#define SENCACHE_DEFAULT_PYTHON ""
#endif

namespace {

// Holds the GIL for one scope, from any thread (re-entrant).
struct Gil {
    PyGILState_STATE state;
    Gil() : state(PyGILState_Ensure()) {}
    ~Gil() { PyGILState_Release(state); }
    Gil(const Gil&) = delete;
    Gil& operator=(const Gil&) = delete;
};

// An owned reference.
struct Ref {
    PyObject* p = nullptr;
    Ref() = default;
    explicit Ref(PyObject* o) : p(o) {}
    Ref(const Ref&) = delete;
    Ref& operator=(const Ref&) = delete;
    Ref(Ref&& o) noexcept : p(o.p) { o.p = nullptr; }
    ~Ref() { Py_XDECREF(p); }
    PyObject* get() const { return p; }
    explicit operator bool() const { return p != nullptr; }
};

std::once_flag python_once;
std::string python_start_error;

// Start an interpreter if the process has none: the Python given by $SENCACHE_PYTHON or at build
// time (a venv's python finds its site-packages), then release the GIL for every thread.
void start_python() {
    if (Py_IsInitialized()) return;  // the host runs Python: use it as it is
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.install_signal_handlers = 0;
    const char* env = std::getenv("SENCACHE_PYTHON");
    const std::string python = env && *env ? env : SENCACHE_DEFAULT_PYTHON;
    PyStatus st = python.empty() ? PyStatus_Ok() : PyConfig_SetBytesString(&config, &config.program_name, python.c_str());
    if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(st)) {
        python_start_error = std::string("cannot start Python (") + (python.empty() ? "default" : python) +
                             "): " + (st.err_msg ? st.err_msg : "unknown error");
        return;
    }
    PyEval_SaveThread();  // the GIL is taken per call from now on
}

void ensure_python() {
    std::call_once(python_once, start_python);
    if (!python_start_error.empty()) throw Error(SC_ERR_PYTHON, python_start_error);
}

// The pending Python exception as an Error with the status host.status() gives it (GIL held).
Error python_error(PyObject* host_module) {
    PyObject *type = nullptr, *value = nullptr, *trace = nullptr;
    PyErr_Fetch(&type, &value, &trace);
    PyErr_NormalizeException(&type, &value, &trace);
    Ref t(type), v(value), tb(trace);
    if (!v) return Error(SC_ERR_PYTHON, "Python error without an exception");
    if (host_module) {
        Ref described(PyObject_CallMethod(host_module, "status", "O", v.get()));
        int code = 0;
        const char* text = nullptr;
        if (described && PyArg_ParseTuple(described.get(), "is", &code, &text))
            return Error(static_cast<sc_status>(code), text);
        PyErr_Clear();
    }
    Ref s(PyObject_Str(v.get()));
    const char* text = s ? PyUnicode_AsUTF8(s.get()) : nullptr;
    PyErr_Clear();
    return Error(SC_ERR_PYTHON, std::string(Py_TYPE(v.get())->tp_name) + ": " + (text ? text : "(no message)"));
}

std::mutex live_mutex;
std::unordered_set<const void*> live;  // engines not yet destroyed: double destroy is a no-op

}  // namespace

struct sc_engine {
    PyObject* module = nullptr;  // sencache.capi.host
    PyObject* host = nullptr;    // its Host
    std::mutex callback_mutex;
    sc_progress_fn callback = nullptr;
    void* user = nullptr;

    Ref call(const char* method, const char* format, ...) {
        va_list args;
        va_start(args, format);
        Ref name(PyUnicode_FromString(method));
        Ref callable(PyObject_GetAttr(host, name.get()));
        Ref arguments(callable ? Py_VaBuildValue(format, args) : nullptr);
        va_end(args);
        if (!arguments) throw python_error(module);
        Ref tuple(PyTuple_Check(arguments.get()) ? (Py_INCREF(arguments.get()), arguments.get())
                                                 : PyTuple_Pack(1, arguments.get()));
        if (!tuple) throw python_error(module);
        Ref result(PyObject_Call(callable.get(), tuple.get(), nullptr));
        if (!result) throw python_error(module);
        return result;
    }
};

namespace {

sc_engine* checked(sc_engine* engine) {
    SC_REQUIRE(engine != nullptr, SC_ERR_INVALID_ARGUMENT, "engine is NULL");
    return engine;
}

void fill(sc_progress* out, int state, int step, int steps, int nfe) {
    out->state = static_cast<sc_state>(state);
    out->step = step;
    out->steps = steps;
    out->nfe = nfe;
}

}  // namespace

extern "C" sc_status sc_engine_create(const char* bundle_dir, const sc_engine_options* options, sc_engine** out) {
    return guarded([&] {
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        *out = nullptr;
        SC_REQUIRE(bundle_dir != nullptr, SC_ERR_INVALID_ARGUMENT, "bundle_dir is NULL");
        const char* backend = options && options->backend ? options->backend : "auto";
        const char* device = options && options->device ? options->device : "cpu";
        const int threads = options ? options->threads : 0;
        SC_REQUIRE(threads >= 0, SC_ERR_INVALID_ARGUMENT, "threads must be >= 0");
        ensure_python();
        Gil gil;
        Ref module(PyImport_ImportModule("sencache.capi.host"));
        if (!module) throw python_error(nullptr);
        Ref cls(PyObject_GetAttrString(module.get(), "Host"));
        Ref host(cls ? PyObject_CallFunction(cls.get(), "sssi", bundle_dir, backend, device, threads) : nullptr);
        if (!host) throw python_error(module.get());
        auto engine = new sc_engine;
        engine->module = module.p;
        engine->host = host.p;
        module.p = host.p = nullptr;
        {
            std::lock_guard<std::mutex> lock(live_mutex);
            live.insert(engine);
        }
        *out = engine;
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_set_progress(sc_engine* engine, sc_progress_fn fn, void* user) {
    return guarded([&] {
        std::lock_guard<std::mutex> lock(checked(engine)->callback_mutex);
        engine->callback = fn;
        engine->user = user;
        return SC_OK;
    });
}

// The image as a NumPy uint8 [height, width, channels] copy (rows packed), through numpy.frombuffer.
static Ref image_array(const sc_image* image, PyObject* module) {
    const size_t row = static_cast<size_t>(image->width) * image->channels;
    std::string packed(row * image->height, '\0');
    for (int32_t y = 0; y < image->height; ++y)
        std::memcpy(&packed[y * row], image->pixels + static_cast<size_t>(y) * image->stride, row);
    Ref buffer(PyBytes_FromStringAndSize(packed.data(), static_cast<Py_ssize_t>(packed.size())));
    Ref numpy(buffer ? PyImport_ImportModule("numpy") : nullptr);
    Ref flat(numpy ? PyObject_CallMethod(numpy.get(), "frombuffer", "Os", buffer.get(), "uint8") : nullptr);
    Ref array(flat ? PyObject_CallMethod(flat.get(), "reshape", "iii", static_cast<int>(image->height),
                                         static_cast<int>(image->width), static_cast<int>(image->channels))
                   : nullptr);
    if (!array) throw python_error(module);
    return array;
}

extern "C" sc_status sc_engine_submit(sc_engine* engine, const sc_request* request, int64_t* id_out) {
    return sc_engine_submit_image(engine, request, nullptr, id_out);
}

extern "C" sc_status sc_engine_submit_image(sc_engine* engine, const sc_request* request, const sc_image* image,
                                            int64_t* id_out) {
    return sc_engine_submit_ex(engine, request, image, nullptr, id_out);
}

// sc_request_extra's guidance_2 where the caller's `size` covers it, else its default (< 0: unset).
static double extra_guidance_2(const sc_request_extra* extra) {
    constexpr size_t end = offsetof(sc_request_extra, guidance_2) + sizeof(double);
    return extra && extra->size >= end ? extra->guidance_2 : -1.0;
}

extern "C" sc_status sc_engine_submit_ex(sc_engine* engine, const sc_request* request, const sc_image* image,
                                         const sc_request_extra* extra, int64_t* id_out) {
    return guarded([&] {
        checked(engine);
        SC_REQUIRE(request != nullptr && id_out != nullptr, SC_ERR_INVALID_ARGUMENT, "request or id_out is NULL");
        *id_out = 0;
        if (extra) {
            SC_REQUIRE(extra->size >= sizeof(extra->size), SC_ERR_INVALID_ARGUMENT,
                       "extra->size must be sizeof(sc_request_extra)");
            SC_REQUIRE(extra->size <= sizeof(sc_request_extra), SC_ERR_UNSUPPORTED,
                       "extra->size is larger than this library's sc_request_extra (a newer sencache.h; see "
                       "sc_abi_version)");
        }
        const double guidance_2 = extra_guidance_2(extra);
        SC_REQUIRE(request->prompt != nullptr, SC_ERR_INVALID_ARGUMENT, "request->prompt is NULL (give \"\" with embeddings)");
        SC_REQUIRE(request->steps >= 0, SC_ERR_INVALID_ARGUMENT, "steps must be >= 0 (0: the bundle's default)");
        SC_REQUIRE(request->seed < (uint64_t{1} << 63), SC_ERR_INVALID_ARGUMENT, "seed must be < 2^63");
        if (request->prompt_embeds) {
            SC_REQUIRE(request->embed_tokens > 0 && request->embed_channels > 0, SC_ERR_BUFFER_SIZE,
                       "prompt_embeds given with embed_tokens or embed_channels <= 0");
        }
        if (image) {
            SC_REQUIRE(image->pixels != nullptr, SC_ERR_INVALID_ARGUMENT, "image->pixels is NULL");
            SC_REQUIRE(image->channels == 3, SC_ERR_INVALID_ARGUMENT, "image->channels must be 3 (RGB pixels)");
            SC_REQUIRE(image->width >= 16 && image->width <= 4096 && image->height >= 16 && image->height <= 4096,
                       SC_ERR_INVALID_ARGUMENT, "image->width and image->height must each be in [16, 4096]");
            SC_REQUIRE(image->stride >= static_cast<int64_t>(image->width) * image->channels, SC_ERR_BUFFER_SIZE,
                       "image->stride is smaller than width * channels bytes");
        }
        Gil gil;
        Ref pixels = image ? image_array(image, engine->module) : Ref(Py_NewRef(Py_None));
        Ref embeds;
        if (request->prompt_embeds) {
            // A NumPy copy [tokens, channels] made through numpy.frombuffer: no NumPy C API needed.
            const size_t bytes = static_cast<size_t>(request->embed_tokens) * request->embed_channels * sizeof(float);
            Ref buffer(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(request->prompt_embeds), bytes));
            Ref numpy(buffer ? PyImport_ImportModule("numpy") : nullptr);
            Ref flat(numpy ? PyObject_CallMethod(numpy.get(), "frombuffer", "Os", buffer.get(), "float32") : nullptr);
            embeds.p = flat ? PyObject_CallMethod(flat.get(), "reshape", "LL", static_cast<long long>(request->embed_tokens),
                                                  static_cast<long long>(request->embed_channels)) : nullptr;
            if (!embeds) throw python_error(engine->module);
        } else {
            embeds.p = Py_NewRef(Py_None);
        }
        Ref id = engine->call("submit", "(sOKidszOd)", request->prompt, embeds.get(),
                              static_cast<unsigned long long>(request->seed), static_cast<int>(request->steps),
                              request->guidance, request->cache ? request->cache : "sencache", request->knobs_json,
                              pixels.get(), guidance_2);
        *id_out = PyLong_AsLongLong(id.get());
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_step(sc_engine* engine, int32_t* active_out) {
    return guarded([&] {
        checked(engine);
        std::vector<std::pair<int64_t, sc_progress>> report;
        int active = 0;
        {
            Gil gil;
            Ref result = engine->call("step", "()");
            PyObject* items = nullptr;
            if (!PyArg_ParseTuple(result.get(), "iO", &active, &items)) throw python_error(engine->module);
            const Py_ssize_t n = PyList_Size(items);
            for (Py_ssize_t i = 0; i < n; ++i) {
                long long id = 0;
                int state = 0, step = 0, steps = 0, nfe = 0;
                if (!PyArg_ParseTuple(PyList_GetItem(items, i), "Liiii", &id, &state, &step, &steps, &nfe))
                    throw python_error(engine->module);
                sc_progress p;
                fill(&p, state, step, steps, nfe);
                report.emplace_back(id, p);
            }
        }
        if (active_out) *active_out = active;
        sc_progress_fn fn;
        void* user;
        {
            std::lock_guard<std::mutex> lock(engine->callback_mutex);
            fn = engine->callback;
            user = engine->user;
        }
        if (fn)
            for (const auto& [id, p] : report) fn(user, id, &p);  // GIL not held
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_poll(sc_engine* engine, int64_t id, sc_progress* out) {
    return guarded([&] {
        checked(engine);
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        Gil gil;
        Ref result = engine->call("poll", "(L)", static_cast<long long>(id));
        int state, step, steps, nfe;
        if (!PyArg_ParseTuple(result.get(), "iiii", &state, &step, &steps, &nfe)) throw python_error(engine->module);
        fill(out, state, step, steps, nfe);
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_cancel(sc_engine* engine, int64_t id, int* cancelled_out) {
    return guarded([&] {
        checked(engine);
        Gil gil;
        Ref result = engine->call("cancel", "(L)", static_cast<long long>(id));
        if (cancelled_out) *cancelled_out = PyObject_IsTrue(result.get()) ? 1 : 0;
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_frames_shape(sc_engine* engine, int64_t id, int64_t shape_out[4]) {
    return guarded([&] {
        checked(engine);
        SC_REQUIRE(shape_out != nullptr, SC_ERR_INVALID_ARGUMENT, "shape_out is NULL");
        Gil gil;
        Ref frames = engine->call("video", "(L)", static_cast<long long>(id));
        Ref shape(PyObject_GetAttrString(frames.get(), "shape"));
        if (!shape || PyTuple_Size(shape.get()) != 4) throw Error(SC_ERR_INTERNAL, "frames are not [T, H, W, 3]");
        for (int i = 0; i < 4; ++i) shape_out[i] = PyLong_AsLongLong(PyTuple_GetItem(shape.get(), i));
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_copy_frames(sc_engine* engine, int64_t id, float* out, size_t count) {
    return guarded([&] {
        checked(engine);
        SC_REQUIRE(out != nullptr, SC_ERR_INVALID_ARGUMENT, "out is NULL");
        Gil gil;
        Ref frames = engine->call("video", "(L)", static_cast<long long>(id));
        Py_buffer view;
        if (PyObject_GetBuffer(frames.get(), &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0)
            throw python_error(engine->module);
        const size_t have = static_cast<size_t>(view.len) / sizeof(float);
        const bool fits = have == count && view.itemsize == sizeof(float);
        if (fits) std::memcpy(out, view.buf, view.len);
        PyBuffer_Release(&view);
        SC_REQUIRE(fits, SC_ERR_BUFFER_SIZE,
                   "the frames of request " + std::to_string(id) + " are " + std::to_string(have) + " floats, out has " +
                       std::to_string(count) + " (see sc_engine_frames_shape)");
        return SC_OK;
    });
}

extern "C" sc_status sc_engine_release(sc_engine* engine, int64_t id) {
    return guarded([&] {
        checked(engine);
        Gil gil;
        engine->call("release", "(L)", static_cast<long long>(id));
        return SC_OK;
    });
}

extern "C" void sc_engine_destroy(sc_engine* engine) {
    if (engine == nullptr) return;
    {
        std::lock_guard<std::mutex> lock(live_mutex);
        if (live.erase(engine) == 0) return;  // destroyed already (or never made here)
    }
    {
        Gil gil;
        PyObject* result = PyObject_CallMethod(engine->host, "close", nullptr);
        if (result == nullptr) PyErr_Clear();  // destroy cannot report: the requests end regardless
        Py_XDECREF(result);
        Py_XDECREF(engine->host);
        Py_XDECREF(engine->module);
    }
    delete engine;
}
