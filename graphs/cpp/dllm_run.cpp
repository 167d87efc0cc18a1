// dllm_run PKG 1,2,3 [--repeat N]
//
// Loads PKG/steps.pt (one TorchScript module: weights and all step state as buffers, a `fill` method
// and one method per step kind) and PKG/plan.json (shapes, ids, the step plan), then does what the
// Python scheduler does: left-pad the prompt into the bucket, fill, call the plan's step methods in
// order, read the canvas. Prints the response ids on stdout and timing on stderr. No Python involved.
//
// CUDA graphs: this runner replays the TorchScript methods as they are. A package exported for CUDA
// runs on the GPU, but capturing its steps with at::cuda::CUDAGraph needs a CUDA build of libtorch,
// and the project has had no GPU to test that path on, so it is not compiled in; the runner says so.
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace {

[[noreturn]] void fail(const std::string& msg) {
  std::cerr << "dllm_run: error: " << msg << "\n";
  std::exit(2);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path);
  if (!f) fail("cannot read " + path + "; PKG must be a folder written by `dllm export`");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// plan.json is written by graphs/export.py: flat keys, ints and one array of strings is all we read.
size_t find_key(const std::string& json, const std::string& key) {
  auto pos = json.find("\"" + key + "\":");
  if (pos == std::string::npos) fail("plan.json has no \"" + key + "\"");
  return pos + key.size() + 3;
}

int64_t get_int(const std::string& json, const std::string& key) {
  auto pos = json.find_first_not_of(" \n", find_key(json, key));
  return std::stoll(json.substr(pos));
}

std::string get_str(const std::string& json, const std::string& key) {
  auto start = json.find('"', find_key(json, key)) + 1;
  return json.substr(start, json.find('"', start) - start);
}

std::vector<std::string> get_str_array(const std::string& json, const std::string& key) {
  auto start = json.find('[', find_key(json, key));
  auto end = json.find(']', start);
  std::vector<std::string> out;
  for (auto q = json.find('"', start); q < end; q = json.find('"', q + 1)) {
    auto close = json.find('"', q + 1);
    out.push_back(json.substr(q + 1, close - q - 1));
    q = close;
  }
  return out;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::stringstream ss(text);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    if (tok.empty()) continue;
    try {
      size_t used = 0;
      ids.push_back(std::stoll(tok, &used));
      if (used != tok.size()) throw std::invalid_argument(tok);
    } catch (const std::exception&) {
      fail("prompt ids must be comma-separated integers, got '" + text + "'");
    }
  }
  if (ids.empty()) fail("the prompt is empty; give at least one token id");
  return ids;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: dllm_run PKG 1,2,3 [--repeat N]\n";
    return 2;
  }
  const std::string pkg = argv[1];
  const auto prompt = parse_ids(argv[2]);
  int repeat = 1;
  if (argc >= 5 && std::string(argv[3]) == "--repeat") repeat = std::max(1, std::atoi(argv[4]));

  const auto json = read_file(pkg + "/plan.json");
  if (get_str(json, "format") != "torchscript") fail("this runner loads torchscript packages");
  const int64_t P = get_int(json, "prompt_bucket"), vocab = get_int(json, "vocab_size");
  const int64_t mask_id = get_int(json, "mask_id"), pad_id = get_int(json, "pad_id");
  const auto plan = get_str_array(json, "plan");
  if (static_cast<int64_t>(prompt.size()) > P)
    fail("prompt has " + std::to_string(prompt.size()) + " tokens but the package's prompt bucket holds " +
         std::to_string(P) + "; export with a larger --prompt-bucket");
  for (auto t : prompt) {
    if (t < 0 || t >= vocab) fail("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                  std::to_string(vocab) + ")");
    if (t == mask_id) fail("token id " + std::to_string(t) + " is the mask id; a prompt cannot contain masks");
  }

  torch::jit::Module mod;
  try {
    mod = torch::jit::load(pkg + "/steps.pt");
  } catch (const c10::Error& e) {
    fail("cannot load " + pkg + "/steps.pt: " + e.what_without_backtrace());
  }
  torch::NoGradGuard no_grad;
  const auto dev = mod.attr("st_tokens").toTensor().device();
  const int64_t n_pad = P - static_cast<int64_t>(prompt.size());
  auto padded = torch::full({1, P}, pad_id, torch::kLong);
  for (size_t i = 0; i < prompt.size(); ++i) padded[0][n_pad + static_cast<int64_t>(i)] = prompt[i];
  padded = padded.to(dev);
  auto npad = torch::tensor({n_pad}, torch::kLong).to(dev);
  auto dummy = torch::zeros({1}, torch::TensorOptions().device(dev));

  std::vector<torch::jit::Method> steps;
  for (const auto& kind : plan) steps.push_back(mod.get_method(kind));
  auto fill = mod.get_method("fill");
  auto sync = [&] { if (dev.is_cuda()) mod.attr("st_step").toTensor().cpu(); };

  std::vector<double> per_step_ms;
  for (int r = 0; r < repeat; ++r) {
    fill({padded, npad});
    sync();
    auto t0 = std::chrono::steady_clock::now();
    for (auto& step : steps) step({dummy});
    sync();
    auto t1 = std::chrono::steady_clock::now();
    per_step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count() / steps.size());
  }
  auto tokens = mod.attr("st_tokens").toTensor().cpu();
  for (int64_t j = P; j < tokens.size(1); ++j) std::cout << (j > P ? "," : "") << tokens[0][j].item<int64_t>();
  std::cout << "\n";
  std::sort(per_step_ms.begin(), per_step_ms.end());
  std::cerr << "dllm_run: " << steps.size() << " steps, median " << per_step_ms[per_step_ms.size() / 2]
            << " ms/step over " << repeat << " run(s) on " << dev << "; CUDA graphs: "
            << (dev.is_cuda() ? "not compiled in (see the note at the top of dllm_run.cpp)" : "n/a on CPU")
            << "\n";
  return 0;
}
