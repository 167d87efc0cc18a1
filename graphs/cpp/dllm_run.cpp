// dllm_run PKG 1,2,3 [--repeat N]
//
// Loads a package written by `dllm export` and does what the Python scheduler does: left-pad the
// prompt into the bucket, fill, run the plan's step kinds in order, read the canvas. Prints the
// response ids on stdout and timing on stderr. No Python involved. Two formats (plan.json "format"):
//   torchscript  PKG/steps.pt: one module, weights and all step state as buffers, a `fill` method and
//                one method per step kind (TorchScript is deprecated since torch 2.11 but still works).
//   aoti         PKG/aoti/<kind>.pt2: one AOTInductor package per step kind plus fill; the runner owns
//                the state tensors (PKG/state.txt: name, dtype, shape) and passes the same ones to
//                every program, which updates them in place.
//
// CUDA graphs: this runner replays the TorchScript methods as they are. A package exported for CUDA
// runs on the GPU, but capturing its steps with at::cuda::CUDAGraph needs a CUDA build of libtorch,
// and the project has had no GPU to test that path on, so it is not compiled in; the runner says so.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <map>

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

// The step programs of a package behind one interface: fill(padded, n_pad), step(kind), tokens().
struct Package {
  virtual ~Package() = default;
  virtual void fill(const at::Tensor& padded, const at::Tensor& n_pad) = 0;
  virtual void step(size_t i) = 0;             // the i-th kind of `kinds`
  virtual at::Tensor tokens() = 0;
  virtual at::Device device() = 0;
};

struct ScriptPackage : Package {
  torch::jit::Module mod;
  std::vector<torch::jit::Method> methods;
  at::Tensor dummy;
  ScriptPackage(const std::string& pkg, const std::vector<std::string>& kinds) {
    try {
      mod = torch::jit::load(pkg + "/steps.pt");
    } catch (const c10::Error& e) {
      fail("cannot load " + pkg + "/steps.pt: " + e.what_without_backtrace());
    }
    for (const auto& k : kinds) methods.push_back(mod.get_method(k));
    dummy = torch::zeros({1}, torch::TensorOptions().device(device()));
  }
  void fill(const at::Tensor& padded, const at::Tensor& n_pad) override {
    mod.get_method("fill")({padded, n_pad});
  }
  void step(size_t i) override { methods[i]({dummy}); }
  at::Tensor tokens() override { return mod.attr("st_tokens").toTensor(); }
  at::Device device() override { return mod.attr("st_tokens").toTensor().device(); }
};

struct AotiPackage : Package {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> fill_prog;
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> progs;
  std::vector<at::Tensor> state;
  size_t tokens_index = 0;
  AotiPackage(const std::string& pkg, const std::vector<std::string>& kinds) {
    std::ifstream f(pkg + "/state.txt");
    if (!f) fail("cannot read " + pkg + "/state.txt; the aoti package is incomplete, export it again");
    static const std::map<std::string, at::ScalarType> dtypes = {
        {"int64", at::kLong}, {"float32", at::kFloat}, {"bool", at::kBool}, {"bfloat16", at::kBFloat16},
        {"float16", at::kHalf}};
    std::string line;
    while (std::getline(f, line)) {
      std::stringstream ss(line);
      std::string name, dtype;
      ss >> name >> dtype;
      std::vector<int64_t> shape;
      for (int64_t d; ss >> d;) shape.push_back(d);
      if (!dtypes.count(dtype)) fail("state.txt: unknown dtype " + dtype);
      if (name == "st_tokens") tokens_index = state.size();
      state.push_back(torch::zeros(shape, dtypes.at(dtype)));
    }
    auto load = [&](const std::string& kind) {
      try {
        return std::make_unique<torch::inductor::AOTIModelPackageLoader>(pkg + "/aoti/" + kind + ".pt2");
      } catch (const std::exception& e) {
        fail("cannot load " + pkg + "/aoti/" + kind + ".pt2: " + e.what());
      }
    };
    fill_prog = load("fill");
    for (const auto& k : kinds) progs.push_back(load(k));
  }
  void fill(const at::Tensor& padded, const at::Tensor& n_pad) override {
    std::vector<at::Tensor> in = {padded, n_pad};
    in.insert(in.end(), state.begin(), state.end());
    fill_prog->run(in);
  }
  void step(size_t i) override { progs[i]->run(state); }
  at::Tensor tokens() override { return state[tokens_index]; }
  at::Device device() override { return at::kCPU; }
};

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
  const auto format = get_str(json, "format");
  if (format != "torchscript" && format != "aoti") fail("unknown package format '" + format + "'");
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

  // the plan's distinct kinds, and for each step the index of its kind
  std::vector<std::string> kinds;
  std::vector<size_t> order;
  for (const auto& k : plan) {
    auto it = std::find(kinds.begin(), kinds.end(), k);
    order.push_back(it - kinds.begin());
    if (it == kinds.end()) kinds.push_back(k);
  }
  torch::NoGradGuard no_grad;
  std::unique_ptr<Package> prog;
  if (format == "aoti")
    prog = std::make_unique<AotiPackage>(pkg, kinds);
  else
    prog = std::make_unique<ScriptPackage>(pkg, kinds);
  const auto dev = prog->device();
  const int64_t n_pad = P - static_cast<int64_t>(prompt.size());
  auto padded = torch::full({1, P}, pad_id, torch::kLong);
  for (size_t i = 0; i < prompt.size(); ++i) padded[0][n_pad + static_cast<int64_t>(i)] = prompt[i];
  padded = padded.to(dev);
  auto npad = torch::tensor({n_pad}, torch::kLong).to(dev);
  auto sync = [&] { if (dev.is_cuda()) prog->tokens().cpu(); };

  std::vector<double> per_step_ms;
  for (int r = 0; r < repeat; ++r) {
    prog->fill(padded, npad);
    sync();
    auto t0 = std::chrono::steady_clock::now();
    for (auto i : order) prog->step(i);
    sync();
    auto t1 = std::chrono::steady_clock::now();
    per_step_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count() / order.size());
  }
  auto tokens = prog->tokens().cpu();
  for (int64_t j = P; j < tokens.size(1); ++j) std::cout << (j > P ? "," : "") << tokens[0][j].item<int64_t>();
  std::cout << "\n";
  std::sort(per_step_ms.begin(), per_step_ms.end());
  std::cerr << "dllm_run: " << format << ", " << order.size() << " steps, median " << per_step_ms[per_step_ms.size() / 2]
            << " ms/step over " << repeat << " run(s) on " << dev << "; CUDA graphs: "
            << (dev.is_cuda() ? "not compiled in (see the note at the top of dllm_run.cpp)" : "n/a on CPU")
            << "\n";
  return 0;
}
