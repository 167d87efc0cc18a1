// dllm_run PKG 1,2,3 [--repeat N]
//
// Loads a package written by `dllm export` and does what the Python scheduler does: left-pad the
// prompt into the bucket, fill, run the plan's step kinds in order, read the canvas. Prints the
// response ids on stdout and timing on stderr. No Python involved. Two formats (plan.json "format"):
//   torchscript  PKG/steps.pt: one module, weights and all step state as buffers, a `fill` method and
//                one method per step kind (TorchScript is deprecated since torch 2.11 but still works).
//   aoti         PKG/aoti/<kind>.pt2: one AOTInductor package per step kind plus fill; the runner loads
//                the weights once (PKG/weights.safetensors, listed in plan.json "weights") and owns the
//                state tensors (PKG/state.txt: name, dtype, shape); every step program takes the weights
//                and then the state, fill takes (padded, n_pad, state), and they update the state in place.
//
// Before running anything the runner validates the package: every file against its sha256 in
// PKG/manifest.txt, plan.json's fields and their consistency, state.txt and the weights against the
// plan, the programs against the plan's kinds, and the AOTI programs check their inputs at run time.
// Every failure, including any exception from libtorch, is one line on stderr and exit status 2. A
// package holds native code: run only packages from a trusted source.
//
// Tensors live on the device recorded in plan.json ("cpu" or "cuda"). CUDA graphs: this runner replays
// the programs as they are; capturing them with at::cuda::CUDAGraph needs a CUDA build of libtorch and
// the project has had no GPU to test that path on, so it is not compiled in; the runner says so.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace {

namespace fs = std::filesystem;

// Every expected failure: thrown, caught once in main, printed as one line, exit 2.
struct Refused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

[[noreturn]] void fail(const std::string& msg) { throw Refused(msg); }

std::string first_line(const std::string& text) {
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

std::string read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + path.string() + "; PKG must be a folder written by `dllm export`");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// ------------------------------------------------------------------ a strict JSON reader

struct Json {
  using Array = std::vector<Json>;
  using Object = std::map<std::string, Json>;
  std::variant<std::nullptr_t, bool, double, std::string, Array, Object> v;
  bool integral = false;  // a number written without fraction or exponent
  int64_t i = 0;

  bool is_int() const { return std::holds_alternative<double>(v) && integral; }
  bool is_str() const { return std::holds_alternative<std::string>(v); }
  bool is_array() const { return std::holds_alternative<Array>(v); }
  bool is_object() const { return std::holds_alternative<Object>(v); }
  const std::string& str() const { return std::get<std::string>(v); }
  const Array& array() const { return std::get<Array>(v); }
  const Object& object() const { return std::get<Object>(v); }
};

class JsonReader {
 public:
  JsonReader(const std::string& text, std::string what) : s_(text), what_(std::move(what)) {}

  Json document() {
    Json j = value(0);
    skip();
    if (p_ != s_.size()) bad("trailing characters");
    return j;
  }

 private:
  const std::string& s_;
  std::string what_;
  size_t p_ = 0;

  [[noreturn]] void bad(const std::string& why) {
    fail(what_ + ": not valid JSON (" + why + " at byte " + std::to_string(p_) + ")");
  }
  void skip() {
    while (p_ < s_.size() && (s_[p_] == ' ' || s_[p_] == '\n' || s_[p_] == '\r' || s_[p_] == '\t')) ++p_;
  }
  bool take(const char* word) {
    size_t n = std::char_traits<char>::length(word);
    if (s_.compare(p_, n, word) != 0) return false;
    p_ += n;
    return true;
  }
  Json value(int depth) {
    if (depth > 64) bad("nesting too deep");
    skip();
    if (p_ >= s_.size()) bad("unexpected end");
    Json j;
    char c = s_[p_];
    if (c == '{') {
      Json::Object obj;
      ++p_;
      skip();
      if (p_ < s_.size() && s_[p_] == '}') return ++p_, j.v = std::move(obj), j;
      while (true) {
        skip();
        if (p_ >= s_.size() || s_[p_] != '"') bad("expected a key");
        std::string key = string();
        skip();
        if (p_ >= s_.size() || s_[p_++] != ':') bad("expected ':'");
        obj[key] = value(depth + 1);
        skip();
        if (p_ < s_.size() && s_[p_] == ',') { ++p_; continue; }
        if (p_ < s_.size() && s_[p_] == '}') { ++p_; break; }
        bad("expected ',' or '}'");
      }
      j.v = std::move(obj);
    } else if (c == '[') {
      Json::Array arr;
      ++p_;
      skip();
      if (p_ < s_.size() && s_[p_] == ']') return ++p_, j.v = std::move(arr), j;
      while (true) {
        arr.push_back(value(depth + 1));
        skip();
        if (p_ < s_.size() && s_[p_] == ',') { ++p_; continue; }
        if (p_ < s_.size() && s_[p_] == ']') { ++p_; break; }
        bad("expected ',' or ']'");
      }
      j.v = std::move(arr);
    } else if (c == '"') {
      j.v = string();
    } else if (take("true")) {
      j.v = true;
    } else if (take("false")) {
      j.v = false;
    } else if (take("null")) {
      j.v = nullptr;
    } else {
      number(j);
    }
    return j;
  }
  std::string string() {
    std::string out;
    ++p_;  // opening quote
    while (p_ < s_.size() && s_[p_] != '"') {
      char c = s_[p_++];
      if (static_cast<unsigned char>(c) < 0x20) bad("control character in a string");
      if (c != '\\') { out += c; continue; }
      if (p_ >= s_.size()) bad("unfinished escape");
      char e = s_[p_++];
      switch (e) {
        case '"': case '\\': case '/': out += e; break;
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'u': {  // only ASCII escapes occur in our files; others are kept as '?'
          if (p_ + 4 > s_.size()) bad("short \\u escape");
          unsigned code = std::stoul(s_.substr(p_, 4), nullptr, 16);
          out += code < 0x80 ? static_cast<char>(code) : '?';
          p_ += 4;
          break;
        }
        default: bad("unknown escape");
      }
    }
    if (p_ >= s_.size()) bad("unterminated string");
    ++p_;
    return out;
  }
  void number(Json& j) {
    size_t start = p_;
    if (p_ < s_.size() && s_[p_] == '-') ++p_;
    size_t digits = p_;
    while (p_ < s_.size() && isdigit(static_cast<unsigned char>(s_[p_]))) ++p_;
    if (p_ == digits) bad("unexpected character");
    bool integral = true;
    if (p_ < s_.size() && (s_[p_] == '.' || s_[p_] == 'e' || s_[p_] == 'E')) {
      integral = false;
      while (p_ < s_.size() && std::string("0123456789.eE+-").find(s_[p_]) != std::string::npos) ++p_;
    }
    const std::string text = s_.substr(start, p_ - start);
    try {
      j.v = std::stod(text);
      if (integral && p_ - digits <= 18) {
        j.integral = true;
        j.i = std::stoll(text);
      }
    } catch (const std::exception&) {
      bad("bad number '" + text + "'");
    }
  }
};

// ------------------------------------------------------------------ SHA-256 (FIPS 180-4)

class Sha256 {
 public:
  void update(const unsigned char* data, size_t n) {
    for (size_t k = 0; k < n; ++k) {
      block_[used_++] = data[k];
      if (used_ == 64) {
        compress();
        used_ = 0;
      }
    }
    bits_ += static_cast<uint64_t>(n) * 8;
  }
  std::string hex() {
    uint64_t bits = bits_;
    unsigned char pad = 0x80;
    update(&pad, 1);
    unsigned char zero = 0;
    while (used_ != 56) update(&zero, 1);
    for (int k = 7; k >= 0; --k) {
      unsigned char b = static_cast<unsigned char>(bits >> (8 * k));
      update(&b, 1);
    }
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (uint32_t w : h_)
      for (int k = 28; k >= 0; k -= 4) out += digits[(w >> k) & 0xf];
    return out;
  }

 private:
  std::array<uint32_t, 8> h_ = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  std::array<unsigned char, 64> block_{};
  size_t used_ = 0;
  uint64_t bits_ = 0;

  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void compress() {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int t = 0; t < 16; ++t)
      w[t] = (uint32_t(block_[4 * t]) << 24) | (uint32_t(block_[4 * t + 1]) << 16) |
             (uint32_t(block_[4 * t + 2]) << 8) | uint32_t(block_[4 * t + 3]);
    for (int t = 16; t < 64; ++t) {
      uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t t1 = h + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[t] + w[t];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e, h_[5] += f, h_[6] += g, h_[7] += h;
  }
};

std::string sha256_of(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + path.string());
  Sha256 h;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h.update(reinterpret_cast<const unsigned char*>(buf.data()), static_cast<size_t>(f.gcount()));
  }
  return h.hex();
}

// The package rule both loaders hold (apps/export/package.py says it in full): plain files and folders, no
// symbolic link anywhere; manifest.txt lists every other file once as "<sha256>  <relative path>" with LF
// line ends (a CR is refused as such); names stay inside the package; every hash matches.
const char* kSymlink = "is a symbolic link; a package holds plain files only, export it again";
const char* kCrlf = "ends with a carriage return (CRLF); manifest.txt has LF line ends, export it again";

void check_manifest(const fs::path& pkg) {
  const auto manifest = pkg / "manifest.txt";
  if (!fs::is_regular_file(manifest))
    fail(pkg.string() + ": no manifest.txt; not a package written by `dllm export` (or an older one: export it again)");
  for (const auto& entry : fs::recursive_directory_iterator(pkg))      // never follows a link: each is seen once
    if (entry.is_symlink()) fail(entry.path().string() + ": " + kSymlink);
  std::map<std::string, std::string> listed;
  std::istringstream lines(read_file(manifest));
  std::string line;
  for (int n = 1; std::getline(lines, line); ++n) {
    if (!line.empty() && line.back() == '\r') fail(manifest.string() + ": line " + std::to_string(n) + " " + kCrlf);
    auto sep = line.find("  ");
    std::string digest = line.substr(0, sep), name = sep == std::string::npos ? "" : line.substr(sep + 2);
    bool ok = sep == 64 && !name.empty() && name[0] != '/' && name.find("..") == std::string::npos &&
              digest.find_first_not_of("0123456789abcdef") == std::string::npos && !listed.count(name);
    if (!ok) fail(manifest.string() + ": line " + std::to_string(n) + " is not '<sha256>  <relative path>'");
    listed[name] = digest;
  }
  std::set<std::string> present;
  for (const auto& entry : fs::recursive_directory_iterator(pkg))
    if (entry.is_regular_file()) {
      auto rel = fs::relative(entry.path(), pkg).generic_string();
      if (rel != "manifest.txt") present.insert(rel);
    }
  for (const auto& [name, digest] : listed)
    if (!present.count(name)) fail(pkg.string() + ": " + name + " is listed in manifest.txt but missing; export again");
  for (const auto& name : present)
    if (!listed.count(name)) fail(pkg.string() + ": " + name + " is not listed in manifest.txt; the package was changed");
  for (const auto& [name, digest] : listed)
    if (sha256_of(pkg / name) != digest)
      fail(pkg.string() + "/" + name + ": content does not match its sha256 in manifest.txt; the package was "
           "changed or damaged, export it again");
}

// ------------------------------------------------------------------ plan.json

const std::map<std::string, at::ScalarType> kDtypes = {
    {"int64", at::kLong},       {"float32", at::kFloat}, {"bool", at::kBool},
    {"bfloat16", at::kBFloat16}, {"float16", at::kHalf},  {"float64", at::kDouble},
    {"int8", at::kChar},         {"uint8", at::kByte},    {"int32", at::kInt}};  // quantized weights

struct Plan {
  std::string format, device;
  int64_t P = 0, G = 0, vocab = 0, mask_id = 0, pad_id = 0;
  std::vector<std::string> kinds, steps, state_names;
  struct Weight { std::string name; at::ScalarType dtype; std::vector<int64_t> shape; };
  std::vector<Weight> weights;
};

int64_t get_int(const Json::Object& o, const std::string& key, int64_t low) {
  auto it = o.find(key);
  if (it == o.end() || !it->second.is_int() || it->second.i < low)
    fail("plan.json: '" + key + "' must be an integer >= " + std::to_string(low));
  return it->second.i;
}

std::string get_str(const Json::Object& o, const std::string& key) {
  auto it = o.find(key);
  if (it == o.end() || !it->second.is_str()) fail("plan.json: '" + key + "' must be a string");
  return it->second.str();
}

std::vector<std::string> get_strs(const Json::Object& o, const std::string& key) {
  auto it = o.find(key);
  if (it == o.end() || !it->second.is_array()) fail("plan.json: '" + key + "' must be a list of strings");
  std::vector<std::string> out;
  for (const auto& j : it->second.array()) {
    if (!j.is_str()) fail("plan.json: '" + key + "' must be a list of strings");
    out.push_back(j.str());
  }
  return out;
}

std::vector<int64_t> get_dims(const Json& j) {
  std::vector<int64_t> out;
  if (!j.is_array()) fail("plan.json: a weight shape must be a list of integers");
  for (const auto& d : j.array()) {
    if (!d.is_int() || d.i < 1) fail("plan.json: a weight shape must be a list of integers >= 1");
    out.push_back(d.i);
  }
  return out;
}

Plan read_plan(const fs::path& pkg) {
  const auto text = read_file(pkg / "plan.json");
  const Json doc = JsonReader(text, "plan.json").document();
  if (!doc.is_object()) fail("plan.json: must be a JSON object");
  const auto& o = doc.object();
  Plan p;
  p.format = get_str(o, "format");
  if (p.format != "torchscript" && p.format != "aoti") fail("plan.json: unknown package format '" + p.format + "'");
  p.device = get_str(o, "device");
  if (p.device != "cpu" && p.device != "cuda") fail("plan.json: unknown device '" + p.device + "'");
  if (get_int(o, "batch", 1) != 1) fail("plan.json: 'batch' must be 1");
  p.P = get_int(o, "prompt_bucket", 1);
  p.G = get_int(o, "gen_length", 1);
  const int64_t block = get_int(o, "block_length", 1), n_steps = get_int(o, "steps", 1);
  p.vocab = get_int(o, "vocab_size", 1);
  p.mask_id = get_int(o, "mask_id", 0);
  p.pad_id = get_int(o, "pad_id", 0);
  if (p.mask_id >= p.vocab || p.pad_id >= p.vocab) fail("plan.json: mask_id / pad_id outside the vocabulary");
  if (p.G % block || n_steps % (p.G / block) || n_steps / (p.G / block) > block)
    fail("plan.json: gen_length, block_length and steps do not fit together");
  p.kinds = get_strs(o, "kinds");
  p.steps = get_strs(o, "plan");
  std::set<std::string> distinct(p.kinds.begin(), p.kinds.end());
  if (p.kinds.empty() || distinct.size() != p.kinds.size()) fail("plan.json: 'kinds' must be distinct step kinds");
  for (const auto& k : p.kinds)
    if (k.empty() || k.find_first_not_of("abcdefghijklmnopqrstuvwxyz_0123456789") != std::string::npos)
      fail("plan.json: step kind '" + k + "' is not a program name");
  if (static_cast<int64_t>(p.steps.size()) != n_steps) fail("plan.json: 'plan' must list 'steps' step kinds");
  for (const auto& k : p.steps)
    if (!distinct.count(k)) fail("plan.json: the plan names kind '" + k + "', which is not in 'kinds'");
  if (p.format == "aoti") {
    p.state_names = get_strs(o, "state_names");
    if (std::find(p.state_names.begin(), p.state_names.end(), "st_tokens") == p.state_names.end())
      fail("plan.json: 'state_names' has no st_tokens");
    auto it = o.find("weights");
    if (it == o.end() || !it->second.is_array() || it->second.array().empty())
      fail("plan.json: 'weights' must list [name, dtype, shape] of every weight input");
    for (const auto& w : it->second.array()) {
      if (!w.is_array() || w.array().size() != 3 || !w.array()[0].is_str() || !w.array()[1].is_str() ||
          !kDtypes.count(w.array()[1].str()))
        fail("plan.json: 'weights' must list [name, dtype, shape] of every weight input");
      p.weights.push_back({w.array()[0].str(), kDtypes.at(w.array()[1].str()), get_dims(w.array()[2])});
    }
  }
  if (p.device == "cuda" && !torch::cuda::is_available())
    fail("the package was exported for cuda but this machine (or this libtorch build) has no CUDA device; "
         "export it again with --device cpu");
  return p;
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

// ------------------------------------------------------------------ the package's programs

// The step programs of a package behind one interface: fill(padded, n_pad), step(kind), tokens().
struct Package {
  virtual ~Package() = default;
  virtual void fill(const at::Tensor& padded, const at::Tensor& n_pad) = 0;
  virtual void step(size_t i) = 0;             // the i-th kind of `kinds`
  virtual at::Tensor tokens() = 0;
};

struct ScriptPackage : Package {
  torch::jit::Module mod;
  std::vector<torch::jit::Method> methods;
  at::Tensor dummy;
  ScriptPackage(const fs::path& pkg, const Plan& plan, at::Device dev) {
    try {
      mod = torch::jit::load((pkg / "steps.pt").string(), dev);
    } catch (const c10::Error& e) {
      fail("cannot load " + (pkg / "steps.pt").string() + ": " + first_line(e.what_without_backtrace()));
    }
    for (const auto& k : std::vector<std::string>{"fill"})
      if (!mod.find_method(k)) fail("steps.pt has no '" + k + "' method");
    for (const auto& k : plan.kinds) {
      auto m = mod.find_method(k);
      if (!m) fail("steps.pt has no method for step kind '" + k + "'");
      methods.push_back(*m);
    }
    if (!mod.hasattr("st_tokens") || !mod.hasattr("w_embed")) fail("steps.pt lacks the st_tokens / w_embed buffers");
    auto t = tokens(), embed = mod.attr("w_embed").toTensor();
    if (t.scalar_type() != at::kLong || t.dim() != 2 || t.size(0) != 1 || t.size(1) != plan.P + plan.G ||
        embed.dim() != 2 || embed.size(0) != plan.vocab)
      fail("steps.pt does not match plan.json (canvas [1, P + G], vocabulary rows)");
    dummy = torch::zeros({1}, torch::TensorOptions().device(dev));
  }
  void fill(const at::Tensor& padded, const at::Tensor& n_pad) override {
    mod.get_method("fill")({padded, n_pad});
  }
  void step(size_t i) override { methods[i]({dummy}); }
  at::Tensor tokens() override { return mod.attr("st_tokens").toTensor(); }
};

// weights.safetensors: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
// data_offsets}}, then the raw bytes. Every weight the plan lists, with the plan's dtype and shape.
std::vector<at::Tensor> load_weights(const fs::path& path, const Plan& plan, at::Device dev) {
  static const std::map<std::string, at::ScalarType> st_dtypes = {
      {"F32", at::kFloat}, {"F16", at::kHalf}, {"BF16", at::kBFloat16}, {"F64", at::kDouble},
      {"I8", at::kChar},   {"U8", at::kByte},  {"I32", at::kInt}};
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("cannot read " + path.string());
  const auto file_size = static_cast<uint64_t>(fs::file_size(path));
  unsigned char head[8];
  if (!f.read(reinterpret_cast<char*>(head), 8)) fail(path.string() + ": too short for a safetensors file");
  uint64_t n = 0;
  for (int k = 7; k >= 0; --k) n = (n << 8) | head[k];
  if (n > file_size - 8 || n > (uint64_t(1) << 30)) fail(path.string() + ": bad safetensors header size");
  std::string header(n, '\0');
  f.read(header.data(), static_cast<std::streamsize>(n));
  const Json doc = JsonReader(header, path.string() + " header").document();
  if (!doc.is_object()) fail(path.string() + ": the header is not a JSON object");
  const uint64_t data_start = 8 + n;
  std::vector<at::Tensor> out;
  for (const auto& w : plan.weights) {
    auto it = doc.object().find(w.name);
    if (it == doc.object().end() || !it->second.is_object()) fail(path.string() + ": no weight '" + w.name + "'");
    const auto& e = it->second.object();
    auto dt = e.find("dtype"), sh = e.find("shape"), off = e.find("data_offsets");
    if (dt == e.end() || !dt->second.is_str() || !st_dtypes.count(dt->second.str()) ||
        st_dtypes.at(dt->second.str()) != w.dtype || sh == e.end() || get_dims(sh->second) != w.shape ||
        off == e.end() || !off->second.is_array() || off->second.array().size() != 2)
      fail(path.string() + ": weight '" + w.name + "' does not have the dtype and shape plan.json lists");
    const auto& o = off->second.array();
    auto t = torch::empty(w.shape, torch::TensorOptions().dtype(w.dtype));
    const uint64_t nbytes = t.numel() * t.element_size();
    if (!o[0].is_int() || !o[1].is_int() || o[0].i < 0 || uint64_t(o[1].i - o[0].i) != nbytes ||
        data_start + uint64_t(o[1].i) > file_size)
      fail(path.string() + ": weight '" + w.name + "' has bad data offsets");
    f.seekg(static_cast<std::streamoff>(data_start + o[0].i));
    if (!f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(nbytes)))
      fail(path.string() + ": cannot read weight '" + w.name + "'");
    out.push_back(t.to(dev));
  }
  return out;
}

// "name dtype d0 d1 ...": one input as a state.txt line, and as each AOTI program records (in its
// metadata "dllm_inputs", one line per input) the inputs it was built for.
std::string spec(const std::string& name, const std::string& dtype, const std::vector<int64_t>& shape) {
  std::string out = name + " " + dtype;
  for (auto d : shape) out += " " + std::to_string(d);
  return out;
}

std::string dtype_name(at::ScalarType t) {
  for (const auto& [name, type] : kDtypes)
    if (type == t) return name;
  return "?";
}

// state.txt: one line per state tensor, "name dtype d0 d1 ...", in plan.json's state_names order;
// specs receives each line normalised.
std::vector<at::Tensor> allocate_state(const fs::path& pkg, const Plan& plan, at::Device dev, size_t* tokens_index,
                                       std::vector<std::string>* specs) {
  std::istringstream lines(read_file(pkg / "state.txt"));
  std::vector<at::Tensor> state;
  std::string line;
  while (std::getline(lines, line)) {
    std::stringstream ss(line);
    std::string name, dtype, dim;
    ss >> name >> dtype;
    if (state.size() >= plan.state_names.size() || name != plan.state_names[state.size()])
      fail("state.txt: the tensors do not match plan.json's state_names");
    if (!kDtypes.count(dtype)) fail("state.txt: unknown dtype '" + dtype + "' for " + name);
    std::vector<int64_t> shape;
    while (ss >> dim) {
      if (dim.find_first_not_of("0123456789") != std::string::npos || dim.size() > 12)
        fail("state.txt: dimension '" + dim + "' of " + name + " is not a size");
      shape.push_back(std::stoll(dim));
    }
    if (name == "st_tokens") {
      if (kDtypes.at(dtype) != at::kLong || shape != std::vector<int64_t>{1, plan.P + plan.G})
        fail("state.txt: st_tokens must be int64 [1, prompt_bucket + gen_length] as in plan.json");
      *tokens_index = state.size();
    }
    specs->push_back(spec(name, dtype, shape));
    state.push_back(torch::zeros(shape, torch::TensorOptions().dtype(kDtypes.at(dtype)).device(dev)));
  }
  if (state.size() != plan.state_names.size()) fail("state.txt: the tensors do not match plan.json's state_names");
  return state;
}

struct AotiPackage : Package {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> fill_prog;
  std::vector<std::unique_ptr<torch::inductor::AOTIModelPackageLoader>> progs;
  std::vector<at::Tensor> state, step_inputs;  // step_inputs: the weights, then the state (same tensors)
  size_t tokens_index = 0;
  AotiPackage(const fs::path& pkg, const Plan& plan, at::Device dev) {
    std::vector<std::string> state_specs, weight_specs;
    state = allocate_state(pkg, plan, dev, &tokens_index, &state_specs);
    step_inputs = load_weights(pkg / "weights.safetensors", plan, dev);
    step_inputs.insert(step_inputs.end(), state.begin(), state.end());
    for (const auto& w : plan.weights) weight_specs.push_back(spec(w.name, dtype_name(w.dtype), w.shape));
    const std::vector<std::string> fill_specs = {spec("padded", "int64", {1, plan.P}), spec("n_pad", "int64", {1})};
    // each program must have been built for exactly these inputs (else running it is undefined behaviour)
    auto load = [&](const std::string& kind, const std::vector<std::string>& head) {
      const auto path = (pkg / "aoti" / (kind + ".pt2")).string();
      std::unique_ptr<torch::inductor::AOTIModelPackageLoader> prog;
      try {
        prog = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path);
      } catch (const std::exception& e) {
        fail("cannot load " + path + ": " + first_line(e.what()));
      }
      std::vector<std::string> lines = head;
      lines.insert(lines.end(), state_specs.begin(), state_specs.end());
      std::string want;
      for (const auto& line : lines) want += (want.empty() ? "" : "\n") + line;
      const auto meta = prog->get_metadata();
      auto it = meta.find("dllm_inputs");
      if (it == meta.end() || it->second != want)
        fail(path + " was built for other inputs than state.txt and plan.json describe; the package is "
             "inconsistent, export it again");
      return prog;
    };
    fill_prog = load("fill", fill_specs);
    for (const auto& k : plan.kinds) progs.push_back(load(k, weight_specs));
  }
  void fill(const at::Tensor& padded, const at::Tensor& n_pad) override {
    std::vector<at::Tensor> in = {padded, n_pad};
    in.insert(in.end(), state.begin(), state.end());
    fill_prog->run(in);
  }
  void step(size_t i) override { progs[i]->run(step_inputs); }
  at::Tensor tokens() override { return state[tokens_index]; }
};

int run(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: dllm_run PKG 1,2,3 [--repeat N]\n";
    return 2;
  }
  const fs::path pkg = argv[1];
  const auto prompt = parse_ids(argv[2]);
  int repeat = 1;
  if (argc == 5 && std::string(argv[3]) == "--repeat") {
    char* end = nullptr;
    long n = std::strtol(argv[4], &end, 10);
    if (*argv[4] == '\0' || *end != '\0' || n < 1) fail(std::string("--repeat takes an integer >= 1, got '") + argv[4] + "'");
    repeat = static_cast<int>(n);
  } else if (argc != 3) {
    fail(std::string("unexpected argument '") + argv[3] + "'; usage: dllm_run PKG 1,2,3 [--repeat N]");
  }

  if (!fs::is_regular_file(pkg / "plan.json"))
    fail("cannot read " + (pkg / "plan.json").string() + "; PKG must be a folder written by `dllm export`");
  check_manifest(pkg);
  const Plan plan = read_plan(pkg);
  const int64_t P = plan.P;
  if (static_cast<int64_t>(prompt.size()) > P)
    fail("prompt has " + std::to_string(prompt.size()) + " tokens but the package's prompt bucket holds " +
         std::to_string(P) + "; export with a larger --prompt-bucket");
  for (auto t : prompt) {
    if (t < 0 || t >= plan.vocab) fail("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                       std::to_string(plan.vocab) + ")");
    if (t == plan.mask_id) fail("token id " + std::to_string(t) + " is the mask id; a prompt cannot contain masks");
  }
  setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", 1);  // AOTI programs check every input's shape and dtype

  // for each step of the plan, the index of its kind
  std::vector<size_t> order;
  for (const auto& k : plan.steps) order.push_back(std::find(plan.kinds.begin(), plan.kinds.end(), k) - plan.kinds.begin());
  torch::NoGradGuard no_grad;
  const at::Device dev = plan.device == "cuda" ? at::Device(at::kCUDA, 0) : at::Device(at::kCPU);
  std::vector<std::string> needed = {"steps.pt"};            // the files plan.json's format names
  if (plan.format == "aoti") {
    needed = {"state.txt", "weights.safetensors", "aoti/fill.pt2"};
    for (const auto& k : plan.kinds) needed.push_back("aoti/" + k + ".pt2");
  }
  for (const auto& f : needed)
    if (!fs::is_regular_file(pkg / f))
      fail(pkg.string() + ": plan.json says format " + plan.format + ", whose " + f +
           " the package lacks; the package is inconsistent, export it again");
  std::unique_ptr<Package> prog;
  if (plan.format == "aoti")
    prog = std::make_unique<AotiPackage>(pkg, plan, dev);
  else
    prog = std::make_unique<ScriptPackage>(pkg, plan, dev);
  const int64_t n_pad = P - static_cast<int64_t>(prompt.size());
  auto padded = torch::full({1, P}, plan.pad_id, torch::kLong);
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
  std::ostringstream ids;
  for (int64_t j = P; j < tokens.size(1); ++j) {
    const int64_t t = tokens[0][j].item<int64_t>();
    if (t == plan.mask_id) fail("the package finished with masked positions left; its plan does not fit its programs");
    ids << (j > P ? "," : "") << t;
  }
  std::cout << ids.str() << "\n";
  std::sort(per_step_ms.begin(), per_step_ms.end());
  std::cerr << "dllm_run: " << plan.format << ", " << order.size() << " steps, median "
            << per_step_ms[per_step_ms.size() / 2] << " ms/step over " << repeat << " run(s) on " << dev
            << "; CUDA graphs: " << (dev.is_cuda() ? "not compiled in (see the note at the top of dllm_run.cpp)" : "n/a on CPU")
            << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const Refused& e) {
    std::cerr << "dllm_run: error: " << e.what() << "\n";
  } catch (const c10::Error& e) {
    std::cerr << "dllm_run: error: " << first_line(e.what_without_backtrace()) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "dllm_run: error: " << first_line(e.what()) << "\n";
  } catch (...) {
    std::cerr << "dllm_run: error: an unknown exception; the package is damaged or incompatible\n";
  }
  return 2;
}
