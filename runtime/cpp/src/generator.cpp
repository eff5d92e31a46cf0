// The autoregressive loop, calm_edge::Generator, step for step the one of runtime/generator.py (read
// its docstring for the why of each rule): eos left-fill of prompts to whole chunks, left padding,
// prefill at the first step, then per step energy head -> decoder -> temperature sampling (CALM), or
// softmax -> inverse-CDF sampling (AR), and at the next step one backbone / AR call on the chosen
// tokens. Same checks, same order of random draws, same stopping, same cache-sizing rule.
#include <algorithm>
#include <chrono>
#include <cmath>

#include "calm_edge.hpp"
#include "model_impl.hpp"
#include "sampling.hpp"
#include "step_state.hpp"

namespace calm_edge {
namespace {

// A prompt filled to whole chunks as the model expects: "eos, then the prompt" (what calm-edge's models
// saw in training when a document began inside a chunk), or pad ids after it (the released models').
TokenIds fill_to_chunks(const TokenIds& ids, const PackageManifest& m) {
  const size_t missing = (m.chunk_size - ids.size() % m.chunk_size) % m.chunk_size;
  if (m.prompt_fill == "right-pad") {
    TokenIds filled(ids);
    filled.insert(filled.end(), missing, m.pad_id);
    return filled;
  }
  TokenIds filled(missing, m.eos_id);
  filled.insert(filled.end(), ids.begin(), ids.end());
  return filled;
}

struct PaddedBatch {
  TokenIds input_ids;       // [batch, width * K]
  TokenIds attention_mask;  // [batch, width]
  TokenIds position_ids;    // [batch, width], counted from each row's first real chunk
  size_t width = 0;         // in chunks
};

PaddedBatch left_pad(const std::vector<TokenIds>& rows, int chunk_size, int64_t pad_id) {
  PaddedBatch batch;
  for (const TokenIds& row : rows) batch.width = std::max(batch.width, row.size() / chunk_size);
  const size_t tokens = batch.width * chunk_size;
  batch.input_ids.assign(rows.size() * tokens, pad_id);
  batch.attention_mask.assign(rows.size() * batch.width, 0);
  batch.position_ids.assign(rows.size() * batch.width, 0);
  for (size_t r = 0; r < rows.size(); ++r) {
    std::copy(rows[r].begin(), rows[r].end(), batch.input_ids.begin() + (r + 1) * tokens - rows[r].size());
    const size_t padding = batch.width - rows[r].size() / chunk_size;
    for (size_t c = padding; c < batch.width; ++c) {
      batch.attention_mask[r * batch.width + c] = 1;
      batch.position_ids[r * batch.width + c] = static_cast<int64_t>(c - padding);
    }
  }
  return batch;
}

void check_params(const GeneratorParams& params) {
  if (params.max_new_tokens < 1)
    throw Error("max_new_tokens=" + std::to_string(params.max_new_tokens) + " must be a positive whole number");
}

void check_prompts(const std::vector<TokenIds>& prompts, int chunk_size, int max_context) {
  if (prompts.empty()) throw Error("no prompts given; pass at least one prompt");
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty())
      throw Error("prompt " + std::to_string(i) + " is empty; give at least one token of text");
    const size_t positions = (prompts[i].size() + chunk_size - 1) / chunk_size;
    if (positions >= static_cast<size_t>(max_context)) {
      const std::string unit = chunk_size > 1 ? "chunks of K tokens" : "tokens";
      throw Error("prompt " + std::to_string(i) + " takes " + std::to_string(positions) + " " + unit +
                  " but the model's context holds " + std::to_string(max_context) +
                  " (including at least one to generate); shorten the prompt");
    }
  }
}

// runtime/generator.py's cache_capacity: the padded prompt plus one position per step of the row that
// can run longest (each row stops after max_new_tokens or when its own positions fill the context).
size_t cache_capacity(const std::vector<TokenIds>& rows, size_t width, int chunk_size, int max_new_tokens,
                      int max_context) {
  const size_t steps_for_tokens = (static_cast<size_t>(max_new_tokens) + chunk_size - 1) / chunk_size;
  size_t most_steps = 0;
  for (const TokenIds& row : rows) {
    const size_t steps_for_context = static_cast<size_t>(max_context) - row.size() / chunk_size + 1;
    most_steps = std::max(most_steps, std::min(steps_for_tokens, steps_for_context));
  }
  return width + most_steps;
}

// One chunk per row (a pad chunk for finished rows), each row drawing from its own stream.
std::vector<Chunk> sample_chunks(const Model::Impl& model, const TemperatureSampler& sampler,
                                 const std::vector<float>& hidden, std::vector<RandomStream>& rngs,
                                 const std::vector<bool>& done) {
  const PackageManifest& m = model.manifest;
  const size_t K = m.chunk_size, noise_size = m.noise_size, hidden_size = m.hidden_size;
  std::vector<size_t> active;
  for (size_t row = 0; row < rngs.size(); ++row)
    if (!done[row]) active.push_back(row);
  std::vector<Chunk> chunks(rngs.size(), Chunk(K, m.pad_id));

  auto hidden_of = [&](size_t row) {
    return std::vector<float>(hidden.begin() + row * hidden_size, hidden.begin() + (row + 1) * hidden_size);
  };
  auto split = [&](const TokenIds& ids, size_t first, size_t count) {
    std::vector<Chunk> result;
    for (size_t c = first; c < first + count; ++c) result.emplace_back(ids.begin() + c * K, ids.begin() + (c + 1) * K);
    return result;
  };

  if (sampler.single_round()) {
    // Every row draws the same number of chunks: one head and one decoder call for the batch.
    const size_t count = sampler.draws_per_round();
    std::vector<float> active_hidden, noise;
    for (size_t row : active) {
      const std::vector<float> row_hidden = hidden_of(row), row_noise = rngs[row].draw(count * noise_size);
      active_hidden.insert(active_hidden.end(), row_hidden.begin(), row_hidden.end());
      noise.insert(noise.end(), row_noise.begin(), row_noise.end());
    }
    const std::vector<float> latents = model.sample_latents(active_hidden, active.size(), noise, count);
    const TokenIds drawn = model.decode(latents, active.size() * count);
    for (size_t a = 0; a < active.size(); ++a)
      chunks[active[a]] = sampler.choose(split(drawn, a * count, count), rngs[active[a]]);
    return chunks;
  }
  for (size_t row : active) {  // the exact sampler: each row until its own acceptance
    const std::vector<float> row_hidden = hidden_of(row);
    RandomStream& rng = rngs[row];
    auto draw_chunks = [&](int count) {
      const std::vector<float> noise = rng.draw(static_cast<size_t>(count) * noise_size);
      const std::vector<float> latents = model.sample_latents(row_hidden, 1, noise, count);
      return split(model.decode(latents, count), 0, count);
    };
    chunks[row] = sampler.sample(draw_chunks, rng);
  }
  return chunks;
}

// AR: p^n normalised (temperature 1/n) in double precision, then the token at the row's next
// uniform by inverse CDF, as runtime/generator.py's softmax_power and sample_from_probs.
std::vector<Chunk> sample_tokens(const std::vector<float>& logits, size_t vocab, int n,
                                 std::vector<RandomStream>& rngs, const std::vector<bool>& done, int64_t pad_id) {
  std::vector<Chunk> tokens;
  std::vector<double> cdf(vocab);
  for (size_t row = 0; row < rngs.size(); ++row) {
    if (done[row]) {
      tokens.push_back({pad_id});
      continue;
    }
    const float* z = logits.data() + row * vocab;
    double largest = -INFINITY;
    for (size_t v = 0; v < vocab; ++v) largest = std::max(largest, static_cast<double>(z[v]) * n);
    std::vector<double> e(vocab);
    double sum = 0;
    for (size_t v = 0; v < vocab; ++v) sum += e[v] = std::exp(static_cast<double>(z[v]) * n - largest);
    double running = 0;
    for (size_t v = 0; v < vocab; ++v) cdf[v] = running += e[v] / sum;
    const double target = static_cast<double>(rngs[row].draw_one()) * cdf.back();
    const size_t index = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
    tokens.push_back({static_cast<int64_t>(std::min(index, vocab - 1))});
  }
  return tokens;
}

}  // namespace

struct Generator::Impl {
  Impl(const Model& model, const std::vector<TokenIds>& prompts, const GeneratorParams& params);

  // Appends a row's new chunk to its tokens, cut at max_new_tokens and (if asked) before eos, and
  // sets the row's stop reason when it is done: eos, enough tokens, or its context is full.
  TokenIds accept(size_t row, const Chunk& chunk);

  // Members in the order of the checks, which the constructor runs as the Python runtime does.
  const std::chrono::steady_clock::time_point began;  // the clock of `times`
  const Model::Impl& model;
  const GeneratorParams params;      // max_new_tokens checked
  const TemperatureSampler sampler;  // temperature, method and candidates checked
  std::vector<TokenIds> rows;        // the prompts, checked and filled to whole chunks
  std::vector<RandomStream> rngs;    // one per row, from the checked streams
  PaddedBatch batch;
  StepState state;
  TokenIds position;  // each row's last position so far
  std::vector<TokenIds> tokens;
  std::vector<std::string> reasons;
  bool started = false;
  std::vector<float> last;    // the step graph's last output: hidden states (CALM) or logits (AR)
  std::vector<Chunk> chunks;  // the chunks the last step chose, fed to the backbone at the next
  StepTimes times;
};

namespace {

const GeneratorParams& checked(const GeneratorParams& params) {
  check_params(params);
  return params;
}

std::vector<TokenIds> checked_rows(const Model::Impl& model, const std::vector<TokenIds>& prompts) {
  const PackageManifest& m = model.manifest;
  check_prompts(prompts, m.chunk_size, m.max_context);
  std::vector<TokenIds> rows;
  for (const TokenIds& prompt : prompts) rows.push_back(fill_to_chunks(prompt, m));
  return rows;
}

std::vector<RandomStream> random_streams(const GeneratorParams& params, size_t prompts) {
  std::vector<uint64_t> streams = params.streams;
  if (streams.empty())
    for (size_t row = 0; row < prompts; ++row) streams.push_back(row);
  if (streams.size() != prompts)
    throw Error(std::to_string(streams.size()) + " random streams for " + std::to_string(prompts) +
                " prompts; give one per prompt");
  std::vector<RandomStream> rngs;
  for (uint64_t stream : streams) rngs.emplace_back(params.seed, stream);
  return rngs;
}

}  // namespace

Generator::Impl::Impl(const Model& model_, const std::vector<TokenIds>& prompts, const GeneratorParams& params_)
    : began(std::chrono::steady_clock::now()),
      model(model_.impl()),
      params(checked(params_)),
      sampler(params.temperature, params.method, params.candidates),
      rows(checked_rows(model, prompts)),
      rngs(random_streams(params, prompts.size())),
      batch(left_pad(rows, model.manifest.chunk_size, model.manifest.pad_id)),
      state(model, rows.size(), cache_capacity(rows, batch.width, model.manifest.chunk_size, params.max_new_tokens,
                                               model.manifest.max_context)),
      position(rows.size()),
      tokens(rows.size()),
      reasons(rows.size()) {
  for (size_t row = 0; row < rows.size(); ++row) position[row] = batch.position_ids[(row + 1) * batch.width - 1];
}

TokenIds Generator::Impl::accept(size_t row, const Chunk& chunk) {
  const PackageManifest& m = model.manifest;
  TokenIds& output = tokens[row];
  const size_t room = params.max_new_tokens - output.size();
  TokenIds kept(chunk.begin(), chunk.begin() + std::min(room, chunk.size()));
  const auto eos = std::find(kept.begin(), kept.end(), m.eos_id);
  if (params.stop_at_eos && eos != kept.end()) {
    kept.erase(eos, kept.end());
    reasons[row] = "eos";
  }
  output.insert(output.end(), kept.begin(), kept.end());
  if (reasons[row].empty()) {
    if (output.size() >= static_cast<size_t>(params.max_new_tokens))
      reasons[row] = "max_new_tokens";
    else if (position[row] + 1 >= m.max_context)
      reasons[row] = "context";
  }
  return kept;
}

Generator::Generator(const Model& model, const std::vector<TokenIds>& prompts, const GeneratorParams& params)
    : impl_(std::make_unique<Impl>(model, prompts, params)) {}
Generator::~Generator() = default;
Generator::Generator(Generator&&) noexcept = default;
Generator& Generator::operator=(Generator&&) noexcept = default;

bool Generator::done() const {
  return std::all_of(impl_->reasons.begin(), impl_->reasons.end(), [](const std::string& r) { return !r.empty(); });
}

void Generator::stop(size_t row, const std::string& reason) {
  if (row >= impl_->reasons.size())
    throw Error("row " + std::to_string(row) + " is not in this batch of " + std::to_string(impl_->reasons.size()));
  impl_->reasons[row] = reason;
}

std::vector<TokenIds> Generator::step() {
  Impl& g = *impl_;
  if (done()) throw Error("the generation is finished: every row has stopped; make a new Generator");
  const PackageManifest& m = g.model.manifest;
  const size_t batch_size = g.rows.size();
  std::vector<bool> finished(batch_size);
  for (size_t row = 0; row < batch_size; ++row) finished[row] = !g.reasons[row].empty();
  try {
    if (!g.started) {
      g.last = g.state.start(g.batch.input_ids, g.batch.attention_mask, g.batch.position_ids);
      g.started = true;
    } else {
      TokenIds step_ids;
      for (size_t row = 0; row < batch_size; ++row) {
        ++g.position[row];
        const Chunk& next = finished[row] ? Chunk(m.chunk_size, m.pad_id) : g.chunks[row];
        step_ids.insert(step_ids.end(), next.begin(), next.end());
      }
      g.last = g.state.advance(step_ids, g.position);
    }
    g.chunks = m.kind == "calm" ? sample_chunks(g.model, g.sampler, g.last, g.rngs, finished)
                                : sample_tokens(g.last, m.vocab_size, g.sampler.n(), g.rngs, finished, m.pad_id);
  } catch (const Ort::Exception& e) {
    // A graph that loads but fails to run does not take the inputs this package format defines.
    throw Error("ONNX Runtime failed to run a graph of " + g.model.path + " (" + e.what() +
                "); the package does not match this calm-edge's format, re-export it");
  }
  std::vector<TokenIds> new_ids(batch_size);
  for (size_t row = 0; row < batch_size; ++row)
    if (!finished[row]) new_ids[row] = g.accept(row, g.chunks[row]);
  g.times.seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - g.began).count());
  return new_ids;
}

const std::vector<TokenIds>& Generator::tokens() const { return impl_->tokens; }
const std::vector<std::string>& Generator::stop_reasons() const { return impl_->reasons; }
const StepTimes& Generator::times() const { return impl_->times; }

std::vector<TokenIds> generate_tokens(const Model& model, const std::vector<TokenIds>& prompts,
                                      const GeneratorParams& params) {
  Generator generator(model, prompts, params);
  while (!generator.done()) generator.step();
  return generator.tokens();
}

}  // namespace calm_edge
