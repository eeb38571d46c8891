// The plan cache: in-memory table, timing of candidates, and the shared file (see plan_cache.h).
#include "plan_cache.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#define SPARSE_EXT_PLAN_FILES 1
#endif

namespace sparse_ext {
namespace {

constexpr const char* kHeader = "sparse_ext plan cache 1";

struct State {
  std::mutex mutex;
  std::map<std::string, std::string> choices;
  std::string file;
  bool file_loaded = false;
  int64_t hits = 0, timed = 0, defaults = 0;
  std::string last_error;
};

State& state() {
  static State s;
  return s;
}

std::atomic<bool>& tuning_flag() {
  static std::atomic<bool> flag([] {
    const char* v = std::getenv("SPARSE_EXT_TUNE");
    return !(v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 ||
                              std::strcmp(v, "false") == 0));
  }());
  return flag;
}

bool valid_field(const std::string& s) {
  return !s.empty() && s.find_first_of("\t\n\r") == std::string::npos;
}

// Entries of a cache file's text; an unknown header or a malformed line contributes nothing, so a
// corrupt or truncated file only costs a re-timing.
struct FileEntry {
  std::string choice;
  std::string seconds;
};

void parse_into(const std::string& text, std::map<std::string, FileEntry>* out) {
  std::istringstream in(text);
  std::string line;
  if (!std::getline(in, line) || line != kHeader) return;
  while (std::getline(in, line)) {
    const size_t a = line.find('\t');
    if (a == std::string::npos) continue;
    const size_t b = line.find('\t', a + 1);
    if (b == std::string::npos || line.find('\t', b + 1) != std::string::npos) continue;
    std::string key = line.substr(0, a), choice = line.substr(a + 1, b - a - 1);
    if (valid_field(key) && valid_field(choice) && line.find('\0') == std::string::npos)
      (*out)[key] = {choice, line.substr(b + 1)};
  }
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return std::string();
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

// Caller holds state().mutex.
void load_file_locked(State& s) {
  if (s.file_loaded || s.file.empty()) return;
  s.file_loaded = true;
  std::map<std::string, FileEntry> from_file;
  parse_into(read_text(s.file), &from_file);
  for (auto& kv : from_file) s.choices.emplace(kv.first, kv.second.choice);  // memory wins
}

#ifdef SPARSE_EXT_PLAN_FILES
void make_parent_dirs(const std::string& path) {
  for (size_t p = path.find('/', 1); p != std::string::npos; p = path.find('/', p + 1))
    ::mkdir(path.substr(0, p).c_str(), 0755);  // EEXIST is fine; a real failure shows at open
}

// Merges one entry into the file under an exclusive lock. Returns "" or what failed.
std::string write_entry(const std::string& path, const std::string& key, const std::string& choice,
                        double seconds) {
  make_parent_dirs(path);
  const std::string lock_path = path + ".lock";
  const int lock = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (lock < 0) return "cannot open " + lock_path + ": " + std::strerror(errno);
  if (::flock(lock, LOCK_EX) != 0) {
    ::close(lock);
    return "cannot lock " + lock_path + ": " + std::strerror(errno);
  }
  std::map<std::string, FileEntry> merged;
  parse_into(read_text(path), &merged);
  char t[32];
  std::snprintf(t, sizeof t, "%.3g", seconds);
  merged[key] = {choice, t};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::string error;
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << kHeader << '\n';
    for (const auto& kv : merged)
      out << kv.first << '\t' << kv.second.choice << '\t' << kv.second.seconds << '\n';
    out.flush();
    if (!out) error = "cannot write " + tmp;
  }
  if (error.empty() && std::rename(tmp.c_str(), path.c_str()) != 0)
    error = "cannot rename " + tmp + " to " + path + ": " + std::strerror(errno);
  if (!error.empty()) std::remove(tmp.c_str());
  ::flock(lock, LOCK_UN);
  ::close(lock);
  return error;
}
#else
std::string write_entry(const std::string&, const std::string&, const std::string&, double) {
  return "plan cache files need POSIX flock; kept in memory";
}
#endif

double seconds_of(const std::function<void(size_t)>& run, size_t i) {
  const auto t0 = std::chrono::steady_clock::now();
  run(i);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

bool plan_tuning_enabled() { return tuning_flag().load(std::memory_order_relaxed); }
void set_plan_tuning_enabled(bool enabled) {
  tuning_flag().store(enabled, std::memory_order_relaxed);
}

void set_plan_cache_file(const std::string& path) {
  State& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  s.file = path;
  s.file_loaded = false;
  s.choices.clear();
}

std::string plan_cache_file() {
  State& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  return s.file;
}

void plan_cache_clear() {
  State& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  s.choices.clear();
  s.file_loaded = false;
  s.hits = s.timed = s.defaults = 0;
  s.last_error.clear();
}

PlanCacheStats plan_cache_stats() {
  State& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  return {s.hits, s.timed, s.defaults, static_cast<int64_t>(s.choices.size()), s.last_error};
}

std::string plan_lookup(const std::string& key) {
  State& s = state();
  std::lock_guard<std::mutex> g(s.mutex);
  load_file_locked(s);
  auto it = s.choices.find(key);
  return it == s.choices.end() ? std::string() : it->second;
}

void plan_record(const std::string& key, const std::string& choice, double seconds) {
  if (!valid_field(key) || !valid_field(choice)) return;
  State& s = state();
  std::string file;
  {
    std::lock_guard<std::mutex> g(s.mutex);
    load_file_locked(s);
    s.choices[key] = choice;
    file = s.file;
  }
  if (file.empty()) return;
  const std::string error = write_entry(file, key, choice, seconds);
  if (!error.empty()) {
    std::lock_guard<std::mutex> g(s.mutex);
    s.last_error = error;
  }
}

size_t plan_choose(const std::string& key, const std::vector<std::string>& candidates,
                   const std::function<void(size_t)>& run) {
  State& s = state();
  if (!plan_tuning_enabled() || candidates.size() < 2) {
    std::lock_guard<std::mutex> g(s.mutex);
    ++s.defaults;
    return 0;
  }
  const std::string recorded = plan_lookup(key);
  if (!recorded.empty()) {
    auto it = std::find(candidates.begin(), candidates.end(), recorded);
    if (it != candidates.end()) {
      std::lock_guard<std::mutex> g(s.mutex);
      ++s.hits;
      return static_cast<size_t>(it - candidates.begin());
    }
  }
  // Interleaved rounds so that a burst of noise from other processes hits every candidate alike;
  // at least 3 rounds, more while the whole timing stays under ~50 ms.
  const size_t n = candidates.size();
  std::vector<std::vector<double>> times(n);
  for (size_t i = 0; i < n; ++i) run(i);
  const auto start = std::chrono::steady_clock::now();
  for (int round = 0; round < 9; ++round) {
    for (size_t j = 0; j < n; ++j) {
      const size_t i = (j + static_cast<size_t>(round)) % n;
      times[i].push_back(seconds_of(run, i));
    }
    const double spent =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (round >= 2 && spent > 0.05) break;
  }
  size_t best = 0;
  double best_time = median(times[0]);
  for (size_t i = 1; i < n; ++i) {
    const double t = median(times[i]);
    if (t < best_time) best = i, best_time = t;
  }
  plan_record(key, candidates[best], best_time);
  std::lock_guard<std::mutex> g(s.mutex);
  ++s.timed;
  return best;
}

int64_t plan_bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) b <<= 1;
  return b;
}

}  // namespace sparse_ext
