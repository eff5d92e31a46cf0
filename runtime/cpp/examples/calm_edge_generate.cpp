// calm-edge-generate: generate text from a model package and stream it to stdout.
//
//   calm-edge-generate PKG "prompt" [--seed N] [--temperature T] [--max-new-tokens N] [--threads N]
//                      [--method batch|exact] [--candidates N] [--stop TEXT]... [--no-stop-at-eos]
//                      [--provider cpu|cuda] [--token-ids] [--timings FILE] [--repeat N]
//
// Exit status: 0 on success, 1 when the package, the prompt or a value is wrong (the message says
// which and how to fix it), 2 for a malformed command line or an integer option outside its range
// (runtime/limits.py's bounds; one line "Error: --NAME VALUE ...").
#include <calm_edge.hpp>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

namespace {

const char* kUsage =
    "usage: calm-edge-generate PKG PROMPT [options]\n"
    "  --seed N             random seed (default 0)\n"
    "  --temperature T      1/n for a whole number n, as 0.5 or 1/2 (default 1)\n"
    "  --max-new-tokens N   tokens to generate at most (default 64)\n"
    "  --threads N          ONNX Runtime intra-op threads (default: its choice)\n"
    "  --spinning P         how ONNX Runtime's threads wait: off, run or on (default run)\n"
    "  --method M           CALM temperature sampling: batch or exact (default batch)\n"
    "  --candidates N       chunks drawn per step by the batch approximation (default 16)\n"
    "  --stop TEXT          stop before TEXT (may be given several times)\n"
    "  --no-stop-at-eos     keep generating after the end-of-text token\n"
    "  --provider P         cpu or cuda (default cpu)\n"
    "  --no-verify          skip the sha256 check of the package files\n"
    "  --token-ids          print the generated token ids instead of the text\n"
    "  --timings FILE       write when each step's tokens were ready (JSON) to FILE\n"
    "  --repeat N           with --token-ids: generate N times over the one loaded model, for\n"
    "                       timings without the first run's warm-up (default 1)\n";

struct UsageError {
  std::string message;
};

struct Options {
  std::string package, prompt;
  calm_edge::GeneratorParams params;
  calm_edge::ModelOptions model;
  bool token_ids = false;
  std::string timings_file;
  int repeat = 1;
};

// A value outside what an option allows: one line "Error: --NAME VALUE ...", exit 2.
struct OptionError {
  std::string message;
};

// The bounds of runtime/limits.py, so both runtimes refuse the same values.
constexpr uint64_t kSeedMax = UINT64_MAX;       // SEED_MAX: seeds are unsigned 64-bit (DESIGN.md)
constexpr uint64_t kMaxNewTokens = 2147483647;  // MAX_NEW_TOKENS: int32 token counts
constexpr uint64_t kMaxCandidates = 65536;      // MAX_CANDIDATES
constexpr uint64_t kThreadsPerCore = 4;         // THREADS_PER_CORE (check_threads)

// `text` must be exactly the decimal digits of a whole number in [low, high]: no sign, no spaces, no
// fraction, nothing that strtoll would saturate or a cast would wrap.
uint64_t parse_whole(const std::string& option, const std::string& text, uint64_t low, uint64_t high,
                     const std::string& why = "") {
  const std::string range = "it must be between " + std::to_string(low) + " and " + std::to_string(high) + why;
  const bool negative = text.size() > 1 && text[0] == '-';
  const std::string digits = negative ? text.substr(1) : text;
  const bool all_digits = !digits.empty() && digits.find_first_not_of("0123456789") == std::string::npos;
  if (!all_digits) throw OptionError{option + " " + text + " is not a whole number: " + range};
  bool too_big = negative;
  uint64_t value = 0;
  for (const char c : digits) {
    const uint64_t digit = static_cast<uint64_t>(c - '0');
    if (value > (UINT64_MAX - digit) / 10) {
      too_big = true;
      break;
    }
    value = value * 10 + digit;
  }
  if (too_big || value < low || value > high) throw OptionError{option + " " + text + " is out of range: " + range};
  return value;
}

// The cores Python's os.cpu_count() counts (limits.check_threads allows 4 threads per core).
uint64_t cores() {
  const unsigned count = std::thread::hardware_concurrency();
  return count ? count : 1;
}

// "0.5" or "1/2".
double parse_temperature(const std::string& text) {
  const size_t slash = text.find('/');
  char* end = nullptr;
  if (slash == std::string::npos) {
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0') throw UsageError{"--temperature needs a number such as 0.5 or 1/2, got '" + text + "'"};
    return value;
  }
  const double numerator = std::strtod(text.substr(0, slash).c_str(), &end);
  const double denominator = std::strtod(text.substr(slash + 1).c_str(), &end);
  if (*end != '\0' || denominator == 0) throw UsageError{"--temperature needs a number such as 0.5 or 1/2, got '" + text + "'"};
  return numerator / denominator;
}

Options parse_arguments(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  for (int k = 1; k < argc; ++k) {
    const std::string argument = argv[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= argc) throw UsageError{argument + " needs a value"};
      return argv[++k];
    };
    if (argument == "-h" || argument == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (argument == "--seed") {
      options.params.seed = parse_whole(argument, value(), 0, kSeedMax, " (an unsigned 64-bit seed)");
    } else if (argument == "--temperature") {
      options.params.temperature = parse_temperature(value());
    } else if (argument == "--max-new-tokens") {
      options.params.max_new_tokens = static_cast<int>(parse_whole(argument, value(), 1, kMaxNewTokens));
    } else if (argument == "--threads") {
      const std::string why = " (" + std::to_string(kThreadsPerCore) + " per core of the " + std::to_string(cores()) +
                              " this machine has)";
      options.model.threads = static_cast<int>(parse_whole(argument, value(), 1, kThreadsPerCore * cores(), why));
    } else if (argument == "--spinning") {
      options.model.spinning = value();
    } else if (argument == "--method") {
      options.params.method = value();
    } else if (argument == "--candidates") {
      options.params.candidates = static_cast<int>(parse_whole(argument, value(), 1, kMaxCandidates));
    } else if (argument == "--stop") {
      options.params.stop_sequences.push_back(value());
    } else if (argument == "--no-stop-at-eos") {
      options.params.stop_at_eos = false;
    } else if (argument == "--provider") {
      options.model.provider = value();
    } else if (argument == "--no-verify") {
      options.model.verify = false;
    } else if (argument == "--token-ids") {
      options.token_ids = true;
    } else if (argument == "--timings") {
      options.timings_file = value();
    } else if (argument == "--repeat") {
      options.repeat = static_cast<int>(parse_whole(argument, value(), 1, kMaxNewTokens));
    } else if (argument.size() > 1 && argument[0] == '-' && argument[1] == '-') {
      throw UsageError{"unknown option " + argument};
    } else {
      positional.push_back(argument);
    }
  }
  if (positional.size() != 2) throw UsageError{"expected a package folder and a prompt"};
  if (!options.token_ids && (!options.timings_file.empty() || options.repeat != 1))
    throw UsageError{"--timings and --repeat measure token generation; add --token-ids"};
  options.package = positional[0];
  options.prompt = positional[1];
  return options;
}

// {"runs": [[seconds at which each step's tokens were ready], ...]}, one list per generation.
void write_timings(const std::string& file, const std::vector<calm_edge::StepTimes>& runs) {
  std::ofstream out(file);
  if (!out) throw calm_edge::Error("cannot write timings to " + file + "; check that its folder exists");
  out.precision(9);
  out << "{\"runs\": [";
  for (size_t r = 0; r < runs.size(); ++r) {
    out << (r ? ", [" : "[");
    for (size_t k = 0; k < runs[r].seconds.size(); ++k) out << (k ? ", " : "") << runs[r].seconds[k];
    out << "]";
  }
  out << "]}\n";
}

int run(const Options& options) {
  const calm_edge::Model model(options.package, options.model);
  if (options.token_ids) {
    const auto prompt_ids = model.tokenizer().encode_prompt(options.prompt);
    if (prompt_ids.empty()) throw calm_edge::Error("prompt 0 is empty; give some text to continue");
    std::vector<calm_edge::StepTimes> runs;
    calm_edge::TokenIds tokens;
    for (int r = 0; r < options.repeat; ++r) {
      calm_edge::Generator generator(model, {prompt_ids}, options.params);
      while (!generator.done()) generator.step();
      tokens = generator.tokens()[0];
      runs.push_back(generator.times());
    }
    for (size_t k = 0; k < tokens.size(); ++k) std::cout << (k ? " " : "") << tokens[k];
    std::cout << "\n";
    if (!options.timings_file.empty()) write_timings(options.timings_file, runs);
    return 0;
  }
  calm_edge::generate(model, options.prompt, options.params,
                      [](const std::string& piece) { std::cout << piece << std::flush; });
  std::cout << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_arguments(argc, argv));
  } catch (const OptionError& e) {
    std::cerr << "Error: " << e.message << "\n";
    return 2;
  } catch (const UsageError& e) {
    std::cerr << "calm-edge-generate: " << e.message << "\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "calm-edge-generate: error: " << e.what() << "\n";
    return 1;
  }
}
