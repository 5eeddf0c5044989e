// apply_rule: apply a compiledopt shape-agnostic TorchScript artifact from C++ (libtorch only,
// no Python).
//
//   apply_rule ARTIFACT_DIR STEPS [LR]
//
// Loads ARTIFACT_DIR/rule.pt, a scripted TensorRule
//
//   forward(Tensor grad, Tensor param, List[Tensor] state, Tensor step) -> (Tensor, List[Tensor])
//
// and runs STEPS steps of  p <- p - lr * direction  on the quadratic 0.5 * ||p - target||^2
// (gradient g = p - target), with step = 0, 1, ..., STEPS-1 as a 0-d int64 tensor. The problem is
// fixed so that every client computes bit-identical inputs:
//
//   p0[i]     = (2i - 11) / 11        i = 0..11, computed in double, rounded to the dtype,
//   target[i] = 0.25 * ((i % 3) - 1)  (exact), both reshaped to (3, 4).
//
// The initial state is the rule's own: the scripted transform's exported `init_state(param)`
// (every compiledopt transform exports it), so its count and shapes always match the graph.
// lr is the command-line LR if given, else the manifest's top-level "lr"; the dtype is the
// manifest's "dtype" (float32 or float64). Prints the final parameter values, row-major, one per
// line (%.9g for float32, %.17g for float64: enough digits to round-trip). Exit status 1 and a
// message on stderr on any error.

#include <torch/script.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// The raw text of the value of `key` in the top-level object of a JSON document (a number as
// written, a string without its quotes), or "" if absent. Enough JSON for manifest.json: it
// skips nested objects, arrays and strings (with escapes), so nested keys never match.
std::string top_level_value(const std::string& json, const std::string& key) {
  int depth = 0;
  size_t i = 0;
  auto read_string = [&](size_t start) {  // json[start] == '"'; returns the content
    std::string out;
    size_t j = start + 1;
    while (j < json.size() && json[j] != '"') {
      if (json[j] == '\\' && j + 1 < json.size()) ++j;
      out += json[j++];
    }
    i = j + 1;
    return out;
  };
  while (i < json.size()) {
    char c = json[i];
    if (c == '"') {
      std::string text = read_string(i);
      if (depth != 1) continue;
      size_t j = i;
      while (j < json.size() && std::isspace(static_cast<unsigned char>(json[j]))) ++j;
      if (j >= json.size() || json[j] != ':') continue;  // a value, not a key
      if (text != key) continue;
      ++j;
      while (j < json.size() && std::isspace(static_cast<unsigned char>(json[j]))) ++j;
      if (j < json.size() && json[j] == '"') {
        return read_string(j);
      }
      size_t end = j;
      while (end < json.size() && json[end] != ',' && json[end] != '}' &&
             !std::isspace(static_cast<unsigned char>(json[end])))
        ++end;
      return json.substr(j, end - j);
    }
    if (c == '{' || c == '[') ++depth;
    if (c == '}' || c == ']') --depth;
    ++i;
  }
  return "";
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

double parse_positive(const std::string& text, const char* what) {
  char* end = nullptr;
  double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(value > 0.0) || value > 1e300) {
    throw std::runtime_error(std::string("invalid ") + what + ": '" + text + "'");
  }
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR STEPS [LR]\n", argv[0]);
    return 2;
  }
  try {
    const std::string dir = argv[1];
    char* end = nullptr;
    const long steps = std::strtol(argv[2], &end, 10);
    if (*argv[2] == '\0' || *end != '\0' || steps < 0) {
      throw std::runtime_error(std::string("invalid STEPS: '") + argv[2] + "'");
    }

    const std::string manifest = read_file(dir + "/manifest.json");
    const std::string kind = top_level_value(manifest, "kind");
    if (kind != "shape_agnostic") {
      throw std::runtime_error(dir + " is a '" + kind +
                               "' artifact; this client runs shape_agnostic ones");
    }
    const double lr = argc == 4 ? parse_positive(argv[3], "LR")
                                : parse_positive(top_level_value(manifest, "lr"), "manifest lr");
    const std::string dtype_name = top_level_value(manifest, "dtype");
    torch::Dtype dtype;
    if (dtype_name == "float32") {
      dtype = torch::kFloat32;
    } else if (dtype_name == "float64") {
      dtype = torch::kFloat64;
    } else {
      throw std::runtime_error("unsupported manifest dtype '" + dtype_name + "'");
    }

    torch::NoGradGuard no_grad;
    torch::jit::Module rule = torch::jit::load(dir + "/rule.pt", torch::kCPU);
    rule.eval();

    std::vector<double> p0(12), t0(12);
    for (int i = 0; i < 12; ++i) {
      p0[i] = (2.0 * i - 11.0) / 11.0;
      t0[i] = 0.25 * ((i % 3) - 1);
    }
    auto as_tensor = [&](const std::vector<double>& values) {
      return torch::tensor(values, torch::kFloat64).to(dtype).reshape({3, 4});
    };
    torch::Tensor param = as_tensor(p0);
    const torch::Tensor target = as_tensor(t0);

    torch::jit::Module transform = rule.attr("transform").toModule();
    c10::List<torch::Tensor> state = transform.run_method("init_state", param).toTensorList();

    for (long k = 0; k < steps; ++k) {
      torch::Tensor grad = param - target;
      torch::Tensor step = torch::scalar_tensor(static_cast<int64_t>(k), torch::kInt64);
      auto out = rule.forward({grad, param, state, step}).toTuple();
      torch::Tensor direction = out->elements()[0].toTensor();
      state = out->elements()[1].toTensorList();
      param = param - lr * direction;
    }

    torch::Tensor values = param.to(torch::kFloat64).contiguous();
    const double* data = values.data_ptr<double>();
    const char* format = dtype == torch::kFloat32 ? "%.9g\n" : "%.17g\n";
    for (int64_t i = 0; i < values.numel(); ++i) std::printf(format, data[i]);
    return 0;
  } catch (const c10::Error& error) {
    std::fprintf(stderr, "apply_rule: %s\n", error.what_without_backtrace());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "apply_rule: %s\n", error.what());
  }
  return 1;
}
