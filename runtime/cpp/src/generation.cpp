// The shared rules of generation (generation.hpp), each the one of runtime/generator.py.
#include "generation.hpp"

#include <algorithm>
#include <cmath>

namespace calm_edge {

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

namespace {

// runtime/generator.py's choose_lazily: each row's batch-approximation chunk from its candidates' latents
// [rows, count, latent]. The decoder runs once on every candidate, its head only on the positions that
// each row's LazyBatchChoice asks for, every row's requests of a round in one call (row by row, in request
// order: at most three head calls a step). The choice uniforms are drawn first, in row order; decoding
// draws nothing, so each stream gives the values it gives plain decoding.
std::vector<Chunk> choose_lazily(const Model::Impl& model, int n, const std::vector<float>& latents, size_t count,
                                 const std::vector<RandomStream*>& rngs) {
  const size_t K = model.manifest.chunk_size, width = model.manifest.decoder_hidden_size, rows = rngs.size();
  const std::vector<float> states = model.decoder_states(latents, rows * count);  // [(row, candidate, position), width]
  std::vector<LazyBatchChoice> choices;
  for (RandomStream* rng : rngs) choices.emplace_back(count, K, n, rng->draw_one());
  for (;;) {
    std::vector<float> wanted;
    size_t sent = 0;
    for (size_t row = 0; row < rows; ++row)
      for (const LazyBatchChoice::Position& at : choices[row].requests()) {
        const size_t state = (row * count + at.candidate) * K + at.position;
        wanted.insert(wanted.end(), states.begin() + state * width, states.begin() + (state + 1) * width);
        ++sent;
      }
    if (sent == 0) break;
    const TokenIds token_ids = model.head_tokens(wanted, sent);
    auto next = token_ids.begin();
    for (LazyBatchChoice& choice : choices) {
      if (choice.done()) continue;
      const auto asked = static_cast<std::ptrdiff_t>(choice.requests().size());
      choice.receive(TokenIds(next, next + asked));
      next += asked;
    }
  }
  std::vector<Chunk> chosen;
  for (const LazyBatchChoice& choice : choices) chosen.push_back(choice.chosen());
  return chosen;
}

}  // namespace

std::vector<Chunk> sample_chunks(const Model::Impl& model, const TemperatureSampler& sampler,
                                 const std::vector<float>& hidden, const std::vector<RandomStream*>& rngs,
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
      const std::vector<float> row_hidden = hidden_of(row), row_noise = rngs[row]->draw(count * noise_size);
      active_hidden.insert(active_hidden.end(), row_hidden.begin(), row_hidden.end());
      noise.insert(noise.end(), row_noise.begin(), row_noise.end());
    }
    const std::vector<float> latents = model.sample_latents(active_hidden, active.size(), noise, count);
    if (sampler.n() > 1 && m.decoder_head_rows_independent) {
      std::vector<RandomStream*> active_rngs;
      for (size_t row : active) active_rngs.push_back(rngs[row]);
      const std::vector<Chunk> chosen = choose_lazily(model, sampler.n(), latents, count, active_rngs);
      for (size_t a = 0; a < active.size(); ++a) chunks[active[a]] = chosen[a];
      return chunks;
    }
    const TokenIds drawn = model.decode(latents, active.size() * count);
    for (size_t a = 0; a < active.size(); ++a)
      chunks[active[a]] = sampler.choose(split(drawn, a * count, count), *rngs[active[a]]);
    return chunks;
  }
  for (size_t row : active) {  // the exact sampler: each row until its own acceptance
    const std::vector<float> row_hidden = hidden_of(row);
    RandomStream& rng = *rngs[row];
    auto draw_chunks = [&](int count) {
      const std::vector<float> noise = rng.draw(static_cast<size_t>(count) * noise_size);
      const std::vector<float> latents = model.sample_latents(row_hidden, 1, noise, count);
      return split(model.decode(latents, count), 0, count);
    };
    chunks[row] = sampler.sample(draw_chunks, rng);
  }
  return chunks;
}

// p^n normalised (temperature 1/n) in double precision, then the token at the row's next uniform by
// inverse CDF, as runtime/generator.py's softmax_power and sample_from_probs.
std::vector<Chunk> sample_tokens(const std::vector<float>& logits, size_t vocab, int n,
                                 const std::vector<RandomStream*>& rngs, const std::vector<bool>& done,
                                 int64_t pad_id) {
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
    const double target = static_cast<double>(rngs[row]->draw_one()) * cdf.back();
    const size_t index = std::upper_bound(cdf.begin(), cdf.end(), target) - cdf.begin();
    tokens.push_back({static_cast<int64_t>(std::min(index, vocab - 1))});
  }
  return tokens;
}

Accepted accept_chunk(const TokenIds& tokens, const Chunk& chunk, const GeneratorParams& params,
                      const PackageManifest& m, int64_t position) {
  const size_t wanted = static_cast<size_t>(params.max_new_tokens);
  const size_t room = wanted > tokens.size() ? wanted - tokens.size() : 0;
  Accepted accepted{TokenIds(chunk.begin(), chunk.begin() + std::min(room, chunk.size())), ""};
  const auto eos = std::find(accepted.kept.begin(), accepted.kept.end(), m.eos_id);
  if (params.stop_at_eos && eos != accepted.kept.end()) {
    accepted.kept.erase(eos, accepted.kept.end());
    accepted.reason = "eos";
  } else if (tokens.size() + accepted.kept.size() >= wanted) {
    accepted.reason = "max_new_tokens";
  } else if (position + 1 >= m.max_context) {
    accepted.reason = "context";
  }
  return accepted;
}

Error graph_error(const Model::Impl& model, const Ort::Exception& e) {
  return Error("ONNX Runtime failed to run a graph of " + model.path + " (" + e.what() +
               "); the package does not match this calm-edge's format, re-export it");
}

}  // namespace calm_edge
