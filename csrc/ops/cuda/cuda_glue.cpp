// The validated-structure cache behind validate_structure_once (see cuda_glue.h).
#include "cuda_glue.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

namespace sparse_ext {
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Validated {
  std::string op;
  std::vector<WeakImpl> impls;
  std::vector<const void*> data;
  std::vector<uint32_t> versions;
};

// Inference tensors carry no version counter, so they are validated on every call.
bool versioned(const at::Tensor& t) { return !t.is_inference(); }

bool matches(const Validated& v, const char* op, std::initializer_list<at::Tensor> ts) {
  if (v.op != op || v.impls.size() != ts.size()) return false;
  size_t i = 0;
  for (const at::Tensor& t : ts) {
    auto alive = v.impls[i].lock();
    if (alive.get() != t.unsafeGetTensorImpl() || v.data[i] != t.data_ptr() ||
        v.versions[i] != t._version())
      return false;
    ++i;
  }
  return true;
}

constexpr size_t kCacheEntries = 256;
std::mutex cache_mutex;
std::deque<Validated> cache;

}  // namespace

void validate_structure_once(const char* op, std::initializer_list<at::Tensor> structure,
                             const std::function<void()>& validate) {
  bool cacheable = true;
  for (const at::Tensor& t : structure) cacheable = cacheable && versioned(t);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (const Validated& v : cache)
      if (matches(v, op, structure)) return;
  }
  validate();
  if (!cacheable) return;
  Validated entry;
  entry.op = op;
  for (const at::Tensor& t : structure) {
    entry.impls.emplace_back(t.getIntrusivePtr());
    entry.data.push_back(t.data_ptr());
    entry.versions.push_back(t._version());
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  // Entries whose tensors were freed can never match again: drop them first, so per-call
  // metadata (e.g. MoE routing outputs) does not evict long-lived weights' entries.
  cache.erase(std::remove_if(cache.begin(), cache.end(),
                             [](const Validated& v) {
                               for (const WeakImpl& w : v.impls)
                                 if (w.expired()) return true;
                               return false;
                             }),
              cache.end());
  cache.push_front(std::move(entry));
  if (cache.size() > kCacheEntries) cache.pop_back();
}

int32_t read_error_code(const at::Tensor& code) { return code.item<int32_t>(); }

}  // namespace sparse_ext
