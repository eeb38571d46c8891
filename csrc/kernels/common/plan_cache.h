// Kernel choice by measurement. Where several ukernels (or tiers, or a dense library call) can
// compute the same result, the op names a plan key (op, dtype, pattern, shape, token bucket, threads,
// tier) and its candidates; the first time a key is seen the candidates are timed on the real
// inputs and the fastest is remembered: in memory, and in a small file that every later process on
// the same machine reads, so only the first process pays for the timing.
//
// File format (text, one entry per line after the header; anything else in the file is ignored):
//   sparse_ext plan cache 1
//   <key> TAB <candidate name> TAB <median seconds of the winner>
// Writers hold an exclusive flock on "<file>.lock", merge their entry into what the file holds
// then, write a temporary file and rename it over the old one: readers never see a partial file,
// and two processes writing at once keep both entries.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace sparse_ext {

// Whether plan_choose chooses at all. On by default; SPARSE_EXT_TUNE=0 in the environment starts
// it off. Off, every op runs its default candidate (the first one) whatever the cache holds: tests
// use that so a result never depends on timing noise or on a file left by an earlier run.
bool plan_tuning_enabled();
void set_plan_tuning_enabled(bool enabled);

// The backing file ("" keeps the cache in memory only, the default). Changing it drops the
// in-memory entries; the new file is read on the next lookup.
void set_plan_cache_file(const std::string& path);
std::string plan_cache_file();

// Forgets every in-memory entry (the file is left as it is) and zeroes the counters.
void plan_cache_clear();

struct PlanCacheStats {
  int64_t hits;      // lookups answered by a recorded choice
  int64_t timed;     // lookups that timed their candidates
  int64_t defaults;  // lookups that took candidate 0 (tuning off, or a single candidate)
  int64_t entries;   // recorded choices in memory
  std::string last_error;  // the last file error (unreadable directory, failed rename), or ""
};
PlanCacheStats plan_cache_stats();

// The recorded choice for `key`, or "" when there is none.
std::string plan_lookup(const std::string& key);

// Records `choice` for `key` in memory and, when a file is set, in the file.
void plan_record(const std::string& key, const std::string& choice, double seconds);

// Index of the candidate to use for `key` (candidates: non-empty, distinct names):
//   - 0 when tuning is off or there is a single candidate;
//   - the recorded choice when it names one of `candidates`;
//   - else, with tuning on and two or more candidates, the fastest by median time of `run(i)`
//     (candidates interleaved round by round, after one warm-up run each), recorded.
// `run(i)` computes the op's full result with candidate i. plan_choose leaves no result behind:
// the caller runs the chosen candidate afterwards (one run more than the timing needed). Keys and
// names must not contain tabs or newlines.
size_t plan_choose(const std::string& key, const std::vector<std::string>& candidates,
                   const std::function<void(size_t)>& run);

// Tokens (or pixels) rounded up to a power of two, so that nearby sizes share a key.
int64_t plan_bucket(int64_t n);

}  // namespace sparse_ext
