// A C interface to PyTorch's c10d process groups (Gloo, and NCCL when built
// with DANCEGRPO_NCCL), for the Rust `dist` module. Every function catches C++
// exceptions and reports them through `err` (a caller-owned buffer).
//
// Tensors cross the boundary as `at::Tensor*`, which is what `tch` hands out.

#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DANCEGRPO_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

struct dg_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace {

void set_error(char* err, size_t len, const char* msg) {
  if (err != nullptr && len > 0) {
    std::snprintf(err, len, "%s", msg);
  }
}

// Runs `f`, turning any exception into a message and a non-zero return.
template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, len, e.what());
  } catch (...) {
    set_error(err, len, "unknown C++ exception");
  }
  return 1;
}

c10::intrusive_ptr<c10d::Store> make_store(
    const char* host, int port, int world, bool is_server, const char* prefix,
    std::chrono::milliseconds timeout) {
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<std::uint16_t>(port);
  opts.isServer = is_server;
  opts.numWorkers = static_cast<std::size_t>(world);
  opts.waitWorkers = true; // clients count themselves in; only the server waits
  opts.timeout = timeout;
  auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
  return c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
}

c10::intrusive_ptr<c10d::Backend> make_backend(
    int kind, const c10::intrusive_ptr<c10d::Store>& store, int rank, int world,
    std::chrono::milliseconds timeout) {
  if (kind == 0) {
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
  }
#ifdef DANCEGRPO_NCCL
  if (kind == 1) {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
  }
  throw std::runtime_error("unknown process group kind");
#else
  throw std::runtime_error(
      "this binary was built without NCCL (build with the `cuda` feature)");
#endif
}

} // namespace

extern "C" {

// 1 when NCCL process groups can be created by this build.
int dg_pg_has_nccl() {
#ifdef DANCEGRPO_NCCL
  return 1;
#else
  return 0;
#endif
}

// A process group of `world` processes (this one is `rank`) meeting at the
// TCPStore `host:port` (served by this process when `is_server`), keys under
// `prefix`. `kind`: 0 Gloo, 1 NCCL. NULL on error.
dg_pg* dg_pg_new(int kind, const char* host, int port, int rank, int world,
                 int is_server, const char* prefix, int64_t timeout_ms,
                 char* err, size_t err_len) {
  dg_pg* out = nullptr;
  guarded(err, err_len, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto store = make_store(host, port, world, is_server != 0, prefix, timeout);
    auto backend = make_backend(kind, store, rank, world, timeout);
    out = new dg_pg{std::move(backend)};
  });
  return out;
}

// Sums `tensor` element-wise over the group, in place, and waits.
int dg_pg_allreduce_sum(dg_pg* pg, const at::Tensor* tensor, char* err,
                        size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> v{*tensor};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    pg->backend->allreduce(v, opts)->wait();
  });
}

// Copies `tensor` of process `root` into every process's `tensor`, and waits.
int dg_pg_broadcast(dg_pg* pg, const at::Tensor* tensor, int root, char* err,
                    size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> v{*tensor};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    pg->backend->broadcast(v, opts)->wait();
  });
}

// Gathers every process's `input` (n elements) into `output` (world * n),
// rank r's at [r n, (r + 1) n), and waits.
int dg_pg_allgather_into(dg_pg* pg, const at::Tensor* output,
                         const at::Tensor* input, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::Tensor out = *output;
    at::Tensor in = *input;
    pg->backend->_allgather_base(out, in, c10d::AllgatherOptions())->wait();
  });
}

// Sums `input` (world * n elements) over the processes and leaves rank r's
// part [r n, (r + 1) n) of the sum in `output` (n elements), and waits.
int dg_pg_reduce_scatter_sum(dg_pg* pg, const at::Tensor* output,
                             const at::Tensor* input, char* err,
                             size_t err_len) {
  return guarded(err, err_len, [&] {
    at::Tensor out = *output;
    at::Tensor in = *input;
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    pg->backend->_reduce_scatter_base(out, in, opts)->wait();
  });
}

// Exchanges equal blocks: `input` (world * n elements) is split into world
// blocks, block j goes to rank j, and `output` (world * n) receives rank j's
// block for this rank at [j n, (j + 1) n); waits. (Ulysses sequence
// parallelism turns a sequence split into a head split with it.)
int dg_pg_all_to_all(dg_pg* pg, const at::Tensor* output,
                     const at::Tensor* input, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::Tensor out = *output;
    at::Tensor in = *input;
    std::vector<int64_t> even;  // empty split sizes: equal blocks
    pg->backend->alltoall_base(out, in, even, even, c10d::AllToAllOptions())->wait();
  });
}

// Releases the process group.
void dg_pg_free(dg_pg* pg) {
  delete pg;
}

} // extern "C"
