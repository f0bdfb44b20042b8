// libminicpmv_et: a C ABI over ExecuTorch's Module API for a `.pte` of this project, used from
// Python through ctypes (the guest's engine_server on the phone profiles, and the x86 check in
// tests/et_ops_check.py). The runtime, the XNNPACK backend and the optimized/quantized kernels are
// the ExecuTorch wheel's binaries; the three llama:: ops come from llama_ops.cpp (project C++).
//
// Every function returns 0 or an ExecuTorch Error code; a failed open fills `err`, a failed run keeps
// a message for mcv_et_last_error (the call, the code, and the last Error line the runtime logged).

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/platform/platform.h>
#include <executorch/runtime/platform/runtime.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#ifndef MCV_ET_VERSION
#define MCV_ET_VERSION "unknown"
#endif

// threadpool.h is not shipped in the wheel: declare the members we call (exported by
// libexecutorch_threadpool.so; a mangled name carries no return type, so this links).
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
  size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

extern "C" int mcv_register_llama_ops();

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

// The runtime logs through the PAL; keep the first and the last Error/Fatal line since the call
// began (the first is usually the cause, the last the failing step), and still print every line
// to stderr as the default PAL does.
std::mutex g_log_mu;
std::string g_first_log, g_last_log;

void emit_log(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
              const char* msg, size_t len) {
  const char* base = file ? std::strrchr(file, '/') : nullptr;
  base = base ? base + 1 : (file ? file : "?");
  std::string m(msg, len);
  while (!m.empty() && (m.back() == '\n' || m.back() == '\r')) m.pop_back();
  std::fprintf(stderr, "%c %s:%zu] %s\n", (char)level, base, line, m.c_str());
  if (level == kError || level == kFatal) {
    std::lock_guard<std::mutex> g(g_log_mu);
    (g_first_log.empty() ? g_first_log : g_last_log) = m;
  }
}

std::string take_log() {
  std::lock_guard<std::mutex> g(g_log_mu);
  std::string s = g_first_log + (g_last_log.empty() ? "" : " ... " + g_last_log);
  g_first_log.clear();
  g_last_log.clear();
  return s;
}

void init_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    executorch::runtime::register_pal(executorch::runtime::PalImpl::create(emit_log, __FILE__));
    executorch::runtime::runtime_init();
  });
}

struct Output {
  int dtype = 0;
  std::vector<int64_t> shape;
  std::vector<unsigned char> bytes;
};

struct Handle {
  std::unique_ptr<Module> module;
  std::vector<Output> outputs;
  std::string error, info, names;
};

int fail(Handle* h, const std::string& what, Error e) {
  std::string log = take_log();
  char code[48];
  std::snprintf(code, sizeof code, " failed (ExecuTorch error 0x%x)", (unsigned)e);
  h->error = what + code + (log.empty() ? "" : ": " + log);
  return (int)e;
}

void put(char* buf, size_t n, const std::string& s) {
  if (buf == nullptr || n == 0) return;
  std::snprintf(buf, n, "%s", s.c_str());
}

size_t element_size(int dtype) {
  switch ((ScalarType)dtype) {
    case ScalarType::Byte: case ScalarType::Char: case ScalarType::Bool: return 1;
    case ScalarType::Short: case ScalarType::Half: case ScalarType::BFloat16: return 2;
    case ScalarType::Int: case ScalarType::Float: return 4;
    case ScalarType::Long: case ScalarType::Double: return 8;
    default: return 0;
  }
}

// A method's outputs, copied at once: with shared arenas the next method may reuse their memory.
// Scalar outputs become 0-d entries so the indices stay the method's.
Error keep_outputs(Handle* h, const std::vector<EValue>& outs) {
  h->outputs.clear();
  for (const EValue& v : outs) {
    Output o;
    if (v.isTensor()) {
      const auto& t = v.toTensor();
      o.dtype = (int)t.scalar_type();
      for (int d = 0; d < t.dim(); ++d) o.shape.push_back(t.size(d));
      const auto* p = static_cast<const unsigned char*>(t.const_data_ptr());
      o.bytes.assign(p, p + t.nbytes());
    } else if (v.isInt() || v.isBool()) {
      int64_t x = v.isInt() ? v.toInt() : (int64_t)v.toBool();
      o.dtype = (int)ScalarType::Long;
      o.bytes.assign((unsigned char*)&x, (unsigned char*)&x + sizeof x);
    } else if (v.isDouble()) {
      double x = v.toDouble();
      o.dtype = (int)ScalarType::Double;
      o.bytes.assign((unsigned char*)&x, (unsigned char*)&x + sizeof x);
    } else {
      return Error::NotSupported;  // lists etc.: no method of this project returns one
    }
    h->outputs.push_back(std::move(o));
  }
  return Error::Ok;
}

}  // namespace

extern "C" {

void* mcv_et_open(const char* pte, int n_threads, char* err, size_t errlen) {
  put(err, errlen, "");
  if (pte == nullptr) { put(err, errlen, "no .pte path"); return nullptr; }
  init_once();
  if (int r = mcv_register_llama_ops()) {
    put(err, errlen, "registering the llama ops failed (error " + std::to_string(r) + ")");
    return nullptr;
  }
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (n_threads > 0 && (pool == nullptr || !pool->_unsafe_reset_threadpool((uint32_t)n_threads))) {
    put(err, errlen, "cannot set the thread pool to " + std::to_string(n_threads) + " threads");
    return nullptr;
  }
  auto h = std::make_unique<Handle>();
  try {
    // share_memory_arenas: the project exports with share_mutable_buffers=True, so the methods
    // share the program's state (KV cache, recurrent state) through one set of arenas.
    h->module = std::make_unique<Module>(pte, Module::LoadMode::Mmap, nullptr, nullptr, nullptr, true);
    take_log();
    Error e = h->module->load();
    if (e != Error::Ok) {
      fail(h.get(), std::string("loading ") + pte, e);
      put(err, errlen, h->error);
      return nullptr;
    }
  } catch (const std::exception& ex) {
    put(err, errlen, std::string("loading ") + pte + ": " + ex.what());
    return nullptr;
  }
  char buf[256];
  std::snprintf(buf, sizeof buf,
                "ExecuTorch %s runtime, XNNPACK and optimized/quantized kernels: the wheel's binaries; "
                "llama ops (custom_sdpa, update_cache, gated_delta_rule): project C++; threads %zu",
                MCV_ET_VERSION, pool ? pool->get_thread_count() : (size_t)1);
  h->info = buf;
  return h.release();
}

int mcv_et_method_names(void* hv, char* buf, size_t n) {
  auto* h = static_cast<Handle*>(hv);
  if (h == nullptr) return (int)Error::InvalidArgument;
  take_log();
  auto names = h->module->method_names();
  if (!names.ok()) return fail(h, "method_names", names.error());
  std::set<std::string> sorted(names->begin(), names->end());  // a stable order for callers
  std::string s;
  for (const auto& m : sorted) s += (s.empty() ? "" : ",") + m;
  if (buf == nullptr || s.size() + 1 > n) {
    h->error = "method_names: buffer of " + std::to_string(n) + " bytes, need " + std::to_string(s.size() + 1);
    return (int)Error::InvalidArgument;
  }
  std::memcpy(buf, s.c_str(), s.size() + 1);
  return 0;
}

int mcv_et_int(void* hv, const char* method, int64_t* out) {
  auto* h = static_cast<Handle*>(hv);
  if (h == nullptr || method == nullptr || out == nullptr) return (int)Error::InvalidArgument;
  take_log();
  auto r = h->module->execute(method);
  if (!r.ok()) return fail(h, method, r.error());
  if (r->empty() || !((*r)[0].isInt() || (*r)[0].isBool())) {
    h->error = std::string(method) + ": the first output is not an int";
    return (int)Error::InvalidType;
  }
  *out = (*r)[0].isInt() ? (*r)[0].toInt() : (int64_t)(*r)[0].toBool();
  return 0;
}

int mcv_et_run(void* hv, const char* method, int n_in, const int* dtype, const int* ndim,
               const int64_t* shapes, void* const* data) {
  auto* h = static_cast<Handle*>(hv);
  if (h == nullptr || method == nullptr || n_in < 0 ||
      (n_in > 0 && (dtype == nullptr || ndim == nullptr || data == nullptr)))
    return (int)Error::InvalidArgument;
  h->outputs.clear();
  std::vector<executorch::extension::TensorPtr> keep;  // the inputs alias the caller's buffers
  std::vector<EValue> inputs;
  const int64_t* sp = shapes;
  for (int i = 0; i < n_in; ++i) {
    if (element_size(dtype[i]) == 0 || ndim[i] < 0 || ndim[i] > 16 || (ndim[i] > 0 && sp == nullptr)) {
      h->error = std::string(method) + ": input " + std::to_string(i) + " has an unsupported dtype or rank";
      return (int)Error::InvalidArgument;
    }
    std::vector<executorch::aten::SizesType> sizes(sp, sp + ndim[i]);
    sp += ndim[i];
    keep.push_back(executorch::extension::from_blob(data[i], std::move(sizes), (ScalarType)dtype[i]));
    inputs.emplace_back(*keep.back());
  }
  take_log();
  auto r = h->module->execute(method, inputs);
  if (!r.ok()) return fail(h, method, r.error());
  Error e = keep_outputs(h, *r);
  if (e != Error::Ok) return fail(h, std::string(method) + ": copying the outputs", e);
  return 0;
}

const char* mcv_et_last_error(void* hv) {
  auto* h = static_cast<Handle*>(hv);
  return h ? h->error.c_str() : "no handle";
}

int mcv_et_n_outputs(void* hv) {
  auto* h = static_cast<Handle*>(hv);
  return h ? (int)h->outputs.size() : -1;
}

int mcv_et_output(void* hv, int i, int* dtype, int* ndim, int64_t* shape) {
  auto* h = static_cast<Handle*>(hv);
  if (h == nullptr || i < 0 || i >= (int)h->outputs.size() || dtype == nullptr || ndim == nullptr)
    return (int)Error::InvalidArgument;
  const Output& o = h->outputs[i];
  if (o.shape.size() > 8) { h->error = "output rank above 8"; return (int)Error::NotSupported; }
  *dtype = o.dtype;
  *ndim = (int)o.shape.size();
  if (shape != nullptr) std::copy(o.shape.begin(), o.shape.end(), shape);
  return 0;
}

int mcv_et_copy_output(void* hv, int i, void* dst, size_t nbytes) {
  auto* h = static_cast<Handle*>(hv);
  if (h == nullptr || i < 0 || i >= (int)h->outputs.size() || dst == nullptr) return (int)Error::InvalidArgument;
  const Output& o = h->outputs[i];
  if (nbytes != o.bytes.size()) {
    h->error = "output " + std::to_string(i) + " holds " + std::to_string(o.bytes.size()) + " bytes, not " +
               std::to_string(nbytes);
    return (int)Error::InvalidArgument;
  }
  if (nbytes) std::memcpy(dst, o.bytes.data(), nbytes);
  return 0;
}

const char* mcv_et_info(void* hv) {
  auto* h = static_cast<Handle*>(hv);
  return h ? h->info.c_str() : "";
}

void mcv_et_close(void* hv) { delete static_cast<Handle*>(hv); }

}  // extern "C"
