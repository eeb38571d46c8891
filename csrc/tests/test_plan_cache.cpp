// The plan cache: default without tuning, the fastest candidate with it, the file round trip, a
// corrupt file, and several processes writing the same file at once.
#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "kernels/common/plan_cache.h"
#include "test_util.h"

using namespace sparse_ext;

namespace {

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_all(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

// Candidate i sleeps `delays_us[i]` microseconds; counts the calls.
struct FakeCandidates {
  std::vector<int> delays_us;
  std::vector<int> calls;
  explicit FakeCandidates(std::vector<int> d) : delays_us(d), calls(d.size(), 0) {}
  std::function<void(size_t)> run() {
    return [this](size_t i) {
      ++calls[i];
      std::this_thread::sleep_for(std::chrono::microseconds(delays_us[i]));
    };
  }
  int total() const {
    int t = 0;
    for (int c : calls) t += c;
    return t;
  }
};

void test_default_without_tuning() {
  set_plan_cache_file("");
  plan_cache_clear();
  set_plan_tuning_enabled(false);
  FakeCandidates f({2000, 10});
  SE_EXPECT(plan_choose("off|key", {"slow", "fast"}, f.run()) == 0, "tuning off takes candidate 0");
  SE_EXPECT(f.total() == 0, "tuning off runs nothing, ran %d", f.total());
  SE_EXPECT(plan_lookup("off|key").empty(), "tuning off records nothing");
  set_plan_tuning_enabled(true);
}

void test_times_and_remembers(const std::string& dir) {
  const std::string file = dir + "/sub/plans.tsv";  // the directory is created on first write
  set_plan_cache_file(file);
  plan_cache_clear();
  FakeCandidates f({3000, 200, 3000});
  SE_EXPECT(plan_choose("spmm|a", {"x", "y", "z"}, f.run()) == 1, "the fastest candidate wins");
  SE_EXPECT(f.calls[0] >= 3 && f.calls[1] >= 3, "every candidate is timed, calls %d %d", f.calls[0],
            f.calls[1]);
  const int before = f.total();
  SE_EXPECT(plan_choose("spmm|a", {"x", "y", "z"}, f.run()) == 1, "the choice is remembered");
  SE_EXPECT(f.total() == before, "a hit runs nothing");
  SE_EXPECT(plan_cache_stats().hits == 1 && plan_cache_stats().timed == 1, "counters");
  set_plan_tuning_enabled(false);
  SE_EXPECT(plan_choose("spmm|a", {"x", "y", "z"}, f.run()) == 0,
            "tuning off ignores a recorded choice");
  set_plan_tuning_enabled(true);
  // A new process (simulated: memory dropped, same file) reads the choice without timing.
  set_plan_cache_file(file);
  plan_cache_clear();
  FakeCandidates g({3000, 200, 3000});
  SE_EXPECT(plan_choose("spmm|a", {"x", "y", "z"}, g.run()) == 1, "the file keeps the choice");
  SE_EXPECT(g.total() == 0, "a choice read from the file runs nothing, ran %d", g.total());
  // A recorded name that is no longer a candidate (a ukernel renamed) is timed again.
  FakeCandidates h({200, 3000});
  SE_EXPECT(plan_choose("spmm|a", {"new", "other"}, h.run()) == 0, "stale choice re-timed");
  SE_EXPECT(h.total() > 0, "stale choice must be timed");
  SE_EXPECT(plan_lookup("spmm|a") == "new", "the new choice replaces the stale one");
}

void test_corrupt_file(const std::string& dir) {
  const std::string file = dir + "/corrupt.tsv";
  const char raw[] = "not a cache\n\x01\x02\x03\0\xff\tweird\n";
  std::string garbage(raw, sizeof raw - 1);
  garbage += std::string(1000, '\t');
  write_all(file, garbage);
  set_plan_cache_file(file);
  plan_cache_clear();
  SE_EXPECT(plan_lookup("k").empty(), "a file with a foreign header contributes nothing");
  FakeCandidates f({1500, 100});
  SE_EXPECT(plan_choose("k", {"a", "b"}, f.run()) == 1, "timing still works");
  const std::string text = read_all(file);
  SE_EXPECT(text.rfind("sparse_ext plan cache 1\n", 0) == 0, "the file is rewritten valid");
  SE_EXPECT(text.find("k\tb\t") != std::string::npos, "and holds the new entry: %s", text.c_str());

  // Right header, some malformed lines: the good lines survive.
  write_all(file, std::string("sparse_ext plan cache 1\ngood\tchoice\t1e-3\nno tabs here\n") +
                      "too\tmany\ttabs\there\n\tempty key\t1\ntrunc");
  set_plan_cache_file(file);
  SE_EXPECT(plan_lookup("good") == "choice", "a valid line is read");
  SE_EXPECT(plan_lookup("no tabs here").empty() && plan_lookup("too").empty() &&
                plan_lookup("trunc").empty(),
            "malformed lines are skipped");
}

// WebAssembly has no fork(): the wasm build (scripts/test_wasm.sh) skips this part.
void test_concurrent_writers(const std::string& dir) {
#if defined(__EMSCRIPTEN__)
  (void)dir;
  std::printf("plan cache: concurrent writers skipped (no fork on WebAssembly)\n");
  return;
#endif
  const std::string file = dir + "/shared.tsv";
  constexpr int kProcs = 4, kKeys = 25;
  std::vector<pid_t> children;
  for (int p = 0; p < kProcs; ++p) {
    const pid_t pid = fork();
    if (pid == 0) {
      set_plan_cache_file(file);
      for (int k = 0; k < kKeys; ++k)
        plan_record("proc" + std::to_string(p) + "|key" + std::to_string(k),
                    "choice" + std::to_string(k), 1e-3);
      _exit(plan_cache_stats().last_error.empty() ? 0 : 1);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    waitpid(pid, &status, 0);
    SE_EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, "writer %d failed", int(pid));
  }
  set_plan_cache_file(file);
  plan_cache_clear();
  int found = 0;
  for (int p = 0; p < kProcs; ++p)
    for (int k = 0; k < kKeys; ++k)
      found += plan_lookup("proc" + std::to_string(p) + "|key" + std::to_string(k)) ==
               "choice" + std::to_string(k);
  SE_EXPECT(found == kProcs * kKeys, "every writer's entries survive: %d of %d", found,
            kProcs * kKeys);
}

// rm -rf without a shell (WebAssembly builds have none).
void remove_tree(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    if (DIR* d = opendir(path.c_str())) {
      while (const dirent* e = readdir(d)) {
        const std::string name = e->d_name;
        if (name != "." && name != "..") remove_tree(path + "/" + name);
      }
      closedir(d);
    }
    if (rmdir(path.c_str()) != 0) std::fprintf(stderr, "could not remove %s\n", path.c_str());
  } else if (unlink(path.c_str()) != 0) {
    std::fprintf(stderr, "could not remove %s\n", path.c_str());
  }
}

void test_bucket() {
  SE_EXPECT(plan_bucket(1) == 1 && plan_bucket(2) == 2 && plan_bucket(3) == 4 &&
                plan_bucket(64) == 64 && plan_bucket(65) == 128,
            "power-of-two buckets");
}

}  // namespace

int main() {
  char tmpl[] = "/tmp/sparse_ext_plan_cache_XXXXXX";
  const char* dir = mkdtemp(tmpl);
  if (dir == nullptr) {
    std::fprintf(stderr, "mkdtemp failed\n");
    return 1;
  }
  test_default_without_tuning();
  test_times_and_remembers(dir);
  test_corrupt_file(dir);
  test_concurrent_writers(dir);
  test_bucket();
  set_plan_cache_file("");
  remove_tree(dir);
  if (sparse_ext_test::failures() == 0) std::printf("plan cache: all passed\n");
  return sparse_ext_test::failures() == 0 ? 0 : 1;
}
