// calm-edge C++ runtime: load a model package, generate text, stream it, or serve many requests at
// once with in-flight batching (Engine, at the end).
//
//     #include <calm_edge.hpp>
//
//     calm_edge::Model model("models/calm-small-int4");
//     calm_edge::GeneratorParams params;
//     params.max_new_tokens = 64;
//     calm_edge::generate(model, "The history of", params,
//                         [](const std::string& piece) { std::cout << piece << std::flush; });
//
// The same behaviour as the Python runtime (calm_edge.runtime): the same package checks, the same
// generation loop and the same counter-based random generator, so for one package, prompt, seed
// and temperature both print the same tokens. Every failure a user can cause throws
// calm_edge::Error with a message that names the file or value and the fix.
//
// This header needs nothing but the C++17 standard library; ONNX Runtime, SentencePiece and the
// JSON reader stay inside the library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace calm_edge {

using TokenIds = std::vector<int64_t>;

// Every error a user can cause: a missing or corrupt file, a manifest mismatch, a prompt longer than
// the context, a temperature the samplers cannot honour, an unknown provider.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The counter-based generator of ../shared/DESIGN.md: value i of (seed, stream) is computed directly,
// so the only state of a stream is how many values it has drawn.
class RandomStream {
 public:
  explicit RandomStream(uint64_t seed, uint64_t stream = 0, uint64_t counter = 0);

  static uint64_t u64(uint64_t seed, uint64_t stream, uint64_t i);
  static float uniform(uint64_t seed, uint64_t stream, uint64_t i);  // top 24 bits * 2^-24, in [0, 1)

  std::vector<float> draw(size_t count);  // the next `count` uniforms
  float draw_one();
  uint64_t counter() const { return counter_; }
  void set_counter(uint64_t counter) { counter_ = counter; }  // e.g. back to the end of an accepted round

 private:
  uint64_t seed_, stream_, counter_;
};

// A package's tokenizer, token for token the Python runtime's (calm_edge/tokenizer.py): SentencePiece
// with calm-edge's handling of a literal U+2581, or a Hugging Face byte-level BPE tokenizer.json (the
// Llama-3 tokenizer of the released CALM models).
class Tokenizer {
 public:
  // A tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE) file, or a folder holding one.
  // `pad_id`: an id that decode drops (the released models' [PAD], as their generate strips it), -1 for none.
  explicit Tokenizer(const std::string& path, int64_t pad_id = -1);
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  TokenIds encode(const std::string& text) const;         // the text alone: no bos or eos added
  TokenIds encode_prompt(const std::string& text) const;  // a prompt as the model reads it: bos first where
                                                          // the tokenizer prepends it (the Llama-3 one does)
  std::string decode(const TokenIds& ids) const;
  int vocab_size() const;
  const std::string& kind() const;  // "sentencepiece" or "hf-bpe"

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

struct ModelOptions {
  std::string provider = "cpu";  // "cpu" or "cuda" (the latter needs an ONNX Runtime built with CUDA)
  int threads = 0;               // intra-op threads; 0 lets ONNX Runtime choose
  std::string spinning = "run";  // how worker threads wait: "off", "run" (spin only while a graph runs) or "on"
  bool verify = true;            // check the sha256 of every file of the package
};

// A model package (CALM or AR) opened on ONNX Runtime. Holds no per-generation state, so one Model
// can serve several threads at once.
class Model {
 public:
  explicit Model(const std::string& package_dir, const ModelOptions& options = {});
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const std::string& kind() const;  // "calm" or "ar"
  int chunk_size() const;           // K tokens per step (1 for AR)
  int max_context() const;          // positions: vectors of K tokens for CALM, tokens for AR
  int64_t eos_id() const;
  int noise_size() const;           // CALM: the energy head's noise per sample
  const Tokenizer& tokenizer() const;

  // The CALM graphs one call at a time, for evaluation (teacher forcing), as the Python Model has them:
  // every chunk's hidden state [S, hidden] of one sequence from an empty cache; the energy head
  // (hidden [rows, hidden], noise [rows, samples, noise_size] in [0, 1) -> latents [rows, samples, latent]);
  // the decoder (latents [rows, latent] -> token ids [rows, K], whatever its layout).
  std::vector<float> hidden_states(const TokenIds& ids) const;
  std::vector<float> sample_latents(const std::vector<float>& hidden, size_t rows, const std::vector<float>& noise,
                                    size_t samples) const;
  TokenIds decode(const std::vector<float>& latents, size_t rows) const;
  // A split decoder (package format 3; decoder_layout() "split") in its two graphs: the decoder's last
  // states [rows, K, decoder_hidden] of latents [rows, latent], and the head's token ids [rows] of any
  // rows of those states [rows, decoder_hidden]. Both throw Error for a "whole" decoder.
  const std::string& decoder_layout() const;
  std::vector<float> decoder_states(const std::vector<float>& latents, size_t rows) const;
  TokenIds head_tokens(const std::vector<float>& states, size_t rows) const;

  struct Impl;  // defined inside the library
  const Impl& impl() const { return *impl_; }

 private:
  std::unique_ptr<Impl> impl_;
};

// What to generate; the same fields and defaults as the Python GeneratorParams.
struct GeneratorParams {
  int max_new_tokens = 64;
  double temperature = 1.0;        // 1/n for a whole number n: 1, 0.5, 0.333..., 0.25, ...
  std::string method = "batch";    // CALM temperature sampling: "batch" (approximation) or "exact"
  int candidates = 16;             // chunks drawn per step by the batch approximation (T < 1)
  uint64_t seed = 0;
  std::vector<std::string> stop_sequences;  // generation stops before the first one
  bool stop_at_eos = true;
  std::vector<uint64_t> streams;   // random stream per prompt; empty means 0, 1, 2, ...
};

struct GenerationResult {
  std::string prompt;
  std::string text;  // the continuation, without the prompt
  TokenIds token_ids;
  std::string stopped_by;  // "eos", "stop_sequence", "max_new_tokens" or "context"
};

// Called with each piece of text as it becomes printable (K tokens at a time for CALM).
using TextCallback = std::function<void(const std::string& piece)>;

// When each step's tokens were ready, in seconds since the Generator was made (prompt checks, the
// cache's allocation, prefill and the first step's sampling are all in the first entry).
struct StepTimes {
  std::vector<double> seconds;
};

// One batch of prompts (token ids) generated step by step, as the Python runtime's Generator: the
// caller owns the loop, sees each step's tokens and may stop a row.
//
//     calm_edge::Generator generator(model, {model.tokenizer().encode("The history of")}, params);
//     while (!generator.done()) {
//       const std::vector<calm_edge::TokenIds> new_ids = generator.step();
//     }
//
// Every check (parameters, prompts, streams) runs in the constructor, before any graph runs.
class Generator {
 public:
  Generator(const Model& model, const std::vector<TokenIds>& prompts, const GeneratorParams& params = {});
  ~Generator();
  Generator(Generator&&) noexcept;
  Generator& operator=(Generator&&) noexcept;

  bool done() const;                    // every row has stopped
  std::vector<TokenIds> step();         // one step: each row's newly accepted token ids (empty once stopped)
  // Stop `row`; the caller's reason replaces the generator's own for the row's last step.
  void stop(size_t row, const std::string& reason = "stop_sequence");

  const std::vector<TokenIds>& tokens() const;           // each row's tokens so far
  const std::vector<std::string>& stop_reasons() const;  // "" while running, else "eos", "max_new_tokens",
                                                         // "context" or the caller's reason
  const StepTimes& times() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// One prompt, streamed through `on_text` if given.
GenerationResult generate(const Model& model, const std::string& prompt, const GeneratorParams& params = {},
                          const TextCallback& on_text = nullptr);

// Several prompts as one left-padded batch.
std::vector<GenerationResult> generate(const Model& model, const std::vector<std::string>& prompts,
                                       const GeneratorParams& params = {});

// New token ids for each prompt of token ids: a Generator run to the end.
std::vector<TokenIds> generate_tokens(const Model& model, const std::vector<TokenIds>& prompts,
                                      const GeneratorParams& params = {});

// What one Engine step did for one request.
struct RequestOutput {
  uint64_t request_id = 0;
  TokenIds new_ids;         // the tokens it accepted at this step (none for a cancelled request)
  std::string stop_reason;  // "" while it runs, else "eos", "max_new_tokens", "context" or "cancelled"
  bool finished() const { return !stop_reason.empty(); }
};

// In-flight (continuous) batching over one Model, token for token the Python runtime's Engine
// (runtime/engine.py), for servers and applications:
//
//     calm_edge::Engine engine(model, 16);
//     const uint64_t id = engine.add_request(model.tokenizer().encode("The history of"), params);
//     while (engine.has_work())
//       for (const calm_edge::RequestOutput& output : engine.step()) { /* output.new_ids ... */ }
//
// A Generator runs one batch from start to end; an Engine keeps one running batch for its whole
// life. A request joins it between two steps and leaves it at the step it ends, so a short request
// never waits for a long one. A step either admits queued requests into free rows (their prompts
// prefilled together, each one's cache placed into the batch's) and samples their first chunk, or
// advances every running row by one chunk (CALM) or token (AR). Each request draws from its own
// RandomStream(seed, stream), so its tokens are those it gets alone from a Generator, whatever joins
// or leaves the batch around it. batching "static" is the classic static batch that the serving
// benchmark compares against: requests are admitted only into an empty batch, and ended rows stay
// (fed pad chunks) until the last one ends. An Engine is used from one thread at a time.
class Engine {
 public:
  // max_batch: the most requests running at once (at least 1); batching: "continuous" or "static".
  explicit Engine(const Model& model, size_t max_batch = 16, const std::string& batching = "continuous");
  ~Engine();
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  // Queue a request; returns its id (0, 1, 2, ... in order, or the caller's own). Every check runs
  // here (the Generator's, and at most one stream: params.streams empty means stream 0).
  uint64_t add_request(const TokenIds& prompt, const GeneratorParams& params = {});
  uint64_t add_request(const TokenIds& prompt, const GeneratorParams& params, uint64_t request_id);
  // End a queued or running request; false if it is neither. The next step reports it "cancelled".
  bool cancel(uint64_t request_id);
  // One step: an output for every request it advanced, admitted or ended.
  std::vector<RequestOutput> step();

  bool has_work() const;   // requests running, queued, or cancelled and not yet reported
  size_t running() const;  // rows in the batch (a static batch counts its ended rows until it empties)
  size_t waiting() const;  // queued requests not cancelled

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace calm_edge
