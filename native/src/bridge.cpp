// The C++ side of align-native: the libtorch APIs tch does not bind, behind a
// narrow C ABI (see lib.rs for the Rust side).
//
// Rules of this file:
// - every extern "C" function catches every exception; errors come back as a
//   malloc'd string (freed by align_native_free_error), success as NULL;
// - a tensor crosses the boundary as tch's C_tensor*, which is an at::Tensor*;
// - one translation unit, only the headers it needs (compile time matters).
//
// Compile-time switches (set by build.rs):
//   ALIGN_GLOO  c10d's ProcessGroupGloo (needs Gloo's headers, libgloo-dev)
//   ALIGN_NCCL  c10d's ProcessGroupNCCL (needs a CUDA libtorch and nccl.h)

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <c10/core/GradMode.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#if defined(ALIGN_GLOO) || defined(ALIGN_NCCL)
#define ALIGN_C10D 1
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef ALIGN_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef ALIGN_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

char* dup_error(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

// Runs f, turning any exception into an error string.
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    // what() carries a C++ backtrace; the message alone is what users need.
    return dup_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_error(e.what());
  } catch (...) {
    return dup_error("unknown C++ exception");
  }
}

std::vector<at::Tensor> tensors(at::Tensor* const* ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; i++) {
    out.push_back(*ts[i]);
  }
  return out;
}

#ifdef ALIGN_C10D
enum Op { OP_SUM = 0, OP_AVG = 1, OP_MAX = 2, OP_MIN = 3 };

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int world;
  bool nccl;
  int64_t device;  // the CUDA device (NCCL) or -1
  std::chrono::milliseconds timeout;
};

// AVG as SUM then a division where the backend lacks it (Gloo).
c10d::ReduceOp reduce_op(const Group& g, int op, bool* divide) {
  *divide = false;
  switch (op) {
    case OP_SUM:
      return c10d::ReduceOp::SUM;
    case OP_AVG:
      if (g.nccl) {
        return c10d::ReduceOp::AVG;
      }
      *divide = true;
      return c10d::ReduceOp::SUM;
    case OP_MAX:
      return c10d::ReduceOp::MAX;
    case OP_MIN:
      return c10d::ReduceOp::MIN;
    default:
      throw std::invalid_argument("unknown reduce op " + std::to_string(op));
  }
}

void wait(const Group& g, const c10::intrusive_ptr<c10d::Work>& work, const char* what) {
  if (!work->wait(g.timeout)) {
    throw std::runtime_error(std::string(what) + " was aborted");
  }
}
#endif

}  // namespace

extern "C" {

void align_native_free_error(char* e) {
  std::free(e);
}

// Bit 0: Gloo, bit 1: NCCL.
uint32_t align_native_backends() {
  uint32_t b = 0;
#ifdef ALIGN_GLOO
  b |= 1;
#endif
#ifdef ALIGN_NCCL
  b |= 2;
#endif
  return b;
}

// One AdamW step over n parameters, as torch.optim.AdamW(fused=True):
// at::_fused_adamw_ with `step` the (already incremented, 1-based) step count.
char* align_native_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads,
                               at::Tensor* const* exp_avgs, at::Tensor* const* exp_avg_sqs,
                               size_t n, double step, double lr, double beta1, double beta2,
                               double weight_decay, double eps) {
  return guarded([&] {
    if (n == 0) {
      return;
    }
    c10::AutoGradMode no_grad(false);
    auto p = tensors(params, n);
    auto g = tensors(grads, n);
    auto m = tensors(exp_avgs, n);
    auto v = tensors(exp_avg_sqs, n);
    // One step tensor per device, shared by that device's parameters (the
    // kernel only reads it).
    std::vector<at::Tensor> steps;
    steps.reserve(n);
    at::Tensor last;
    for (size_t i = 0; i < n; i++) {
      if (!last.defined() || last.device() != p[i].device()) {
        last = at::full({}, step, p[i].options().dtype(at::kFloat));
      }
      steps.push_back(last);
    }
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
  });
}

// A process group: a TCPStore at master_addr:port (rank 0 serves it unless
// `store_is_external`, as under torchrun's agent store), then the backend
// ("gloo" or "nccl"). `timeout_ms` bounds the rendezvous and every
// collective.
char* align_native_group_new(const char* backend, const char* master_addr, uint16_t port,
                             int rank, int world, int64_t device, int store_is_external,
                             const char* prefix, int64_t timeout_ms, void** out) {
  *out = nullptr;
  return guarded([&] {
    std::string name(backend);
#ifndef ALIGN_C10D
    (void)master_addr; (void)port; (void)rank; (void)world; (void)device;
    (void)store_is_external; (void)prefix; (void)timeout_ms;
    throw std::runtime_error("backend " + name + " is not compiled into align (no Gloo headers, no NCCL)");
#else
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = rank == 0 && !store_is_external;
    so.numWorkers = world;
    so.waitWorkers = true;
    so.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> tcp;
    try {
      tcp = c10::make_intrusive<c10d::TCPStore>(std::string(master_addr), so);
    } catch (const c10::Error& e) {
      throw std::runtime_error(std::string("TCPStore: ") + e.what_without_backtrace());
    }
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto g = std::make_unique<Group>();
    g->store = store;
    g->rank = rank;
    g->world = world;
    g->timeout = timeout;
    g->device = device;
    g->nccl = false;
    if (name == "gloo") {
#ifdef ALIGN_GLOO
      auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      std::string addr(master_addr);
      if (ifname != nullptr && *ifname != 0) {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
      } else if (addr == "127.0.0.1" || addr == "localhost" || addr == "::1") {
        // Every rank is on this machine: loopback, whatever the hostname resolves to.
        opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
      } else {
        opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
#else
      throw std::runtime_error(
          "align was built without Gloo (libgloo-dev's headers were missing at build time; "
          "install libgloo-dev and rebuild)");
#endif
    } else if (name == "nccl") {
#ifdef ALIGN_NCCL
      // Without blocking wait a collective that never completes only stalls the
      // CUDA stream; with it, wait() fails after the timeout.
      setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
      auto opts = c10d::ProcessGroupNCCL::Options::create();
      opts->timeout = timeout;
      g->nccl = true;
      g->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
#else
      throw std::runtime_error(
          "align was built without NCCL (it needs a CUDA build of libtorch and nccl.h at build time)");
#endif
    } else {
      throw std::invalid_argument("unknown backend '" + name + "' (gloo or nccl)");
    }
    *out = g.release();
#endif
  });
}

void align_native_group_free(void* group) {
#ifdef ALIGN_C10D
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
#else
  (void)group;
#endif
}

#ifdef ALIGN_C10D
char* align_native_all_reduce(void* group, at::Tensor* t, int op) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    bool divide = false;
    c10d::AllreduceOptions o;
    o.reduceOp = reduce_op(g, op, &divide);
    o.timeout = g.timeout;
    std::vector<at::Tensor> ts{*t};
    wait(g, g.backend->allreduce(ts, o), "all_reduce");
    if (divide) {
      c10::AutoGradMode no_grad(false);
      t->div_(g.world);
    }
  });
}

char* align_native_broadcast(void* group, at::Tensor* t, int root) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g.timeout;
    std::vector<at::Tensor> ts{*t};
    wait(g, g.backend->broadcast(ts, o), "broadcast");
  });
}

char* align_native_barrier(void* group) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    c10d::BarrierOptions o;
    o.timeout = g.timeout;
    if (g.nccl && g.device >= 0) {
      o.device_ids = {g.device};
    }
    wait(g, g.backend->barrier(o), "barrier");
  });
}

// outputs: `world` tensors shaped like input; output i receives rank i's input.
char* align_native_all_gather(void* group, at::Tensor* input, at::Tensor* const* outputs, size_t n) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    c10d::AllgatherOptions o;
    o.timeout = g.timeout;
    std::vector<std::vector<at::Tensor>> outs{tensors(outputs, n)};
    std::vector<at::Tensor> ins{*input};
    wait(g, g.backend->allgather(outs, ins, o), "all_gather");
  });
}

// inputs: `world` tensors shaped like output; this rank's output is the
// reduction over ranks of their inputs[rank].
char* align_native_reduce_scatter(void* group, at::Tensor* output, at::Tensor* const* inputs, size_t n,
                                  int op) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    bool divide = false;
    c10d::ReduceScatterOptions o;
    o.reduceOp = reduce_op(g, op, &divide);
    o.timeout = g.timeout;
    std::vector<at::Tensor> outs{*output};
    std::vector<std::vector<at::Tensor>> ins{tensors(inputs, n)};
    wait(g, g.backend->reduce_scatter(outs, ins, o), "reduce_scatter");
    if (divide) {
      c10::AutoGradMode no_grad(false);
      output->div_(g.world);
    }
  });
}
#else
// Built without any backend: no group can exist, so these are never reached.
char* align_native_all_reduce(void*, at::Tensor*, int) {
  return dup_error("no distributed backend compiled in");
}
char* align_native_broadcast(void*, at::Tensor*, int) {
  return dup_error("no distributed backend compiled in");
}
char* align_native_barrier(void*) {
  return dup_error("no distributed backend compiled in");
}
char* align_native_all_gather(void*, at::Tensor*, at::Tensor* const*, size_t) {
  return dup_error("no distributed backend compiled in");
}
char* align_native_reduce_scatter(void*, at::Tensor*, at::Tensor* const*, size_t, int) {
  return dup_error("no distributed backend compiled in");
}
#endif

}  // extern "C"
