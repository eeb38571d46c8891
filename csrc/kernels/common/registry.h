// A family's ukernel registry: every (ISA x value type x variant) combination whose ukernels are
// compiled into this build, in enumeration order, built once on first use. The C++ tests and the
// Python registry dumps expand it, so a new table entry is tested against the scalar reference.
#pragma once

#include <cstddef>
#include <vector>

namespace sparse_ext {

// Entry is a family's registry entry: its key fields and a `kernels` table pointer.
template <typename Entry>
class UkernelRegistry {
 public:
  // enumerate(add) calls add(entry) for every candidate combination; entries whose lookup gave no
  // ukernels (ISA not compiled in, variant not implemented there) are left out.
  template <typename Enumerate>
  explicit UkernelRegistry(Enumerate enumerate) {
    enumerate([this](const Entry& e) {
      if (e.kernels != nullptr) entries_.push_back(e);
    });
  }

  int size() const { return static_cast<int>(entries_.size()); }
  const Entry& entry(int i) const { return entries_[static_cast<size_t>(i)]; }

 private:
  std::vector<Entry> entries_;
};

}  // namespace sparse_ext
