// The autoregressive loop, calm_edge::Generator, step for step the one of runtime/generator.py (read
// its docstring for the why of each rule): eos left-fill of prompts to whole chunks, left padding,
// prefill at the first step, then per step energy head -> decoder -> temperature sampling (CALM), or
// softmax -> inverse-CDF sampling (AR), and at the next step one backbone / AR call on the chosen
// tokens. Same checks, same order of random draws, same stopping, same cache-sizing rule.
#include <algorithm>
#include <chrono>

#include "calm_edge.hpp"
#include "generation.hpp"
#include "model_impl.hpp"
#include "sampling.hpp"
#include "step_state.hpp"

namespace calm_edge {
namespace {

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

}  // namespace

struct Generator::Impl {
  Impl(const Model& model, const std::vector<TokenIds>& prompts, const GeneratorParams& params);

  // Appends what a row keeps of its new chunk (accept_chunk) to its tokens, and sets the row's stop
  // reason when it is done, unless the caller stopped it first.
  TokenIds accept(size_t row, const Chunk& chunk);

  // Members in the order of the checks, which the constructor runs as the Python runtime does.
  const std::chrono::steady_clock::time_point began;  // the clock of `times`
  const Model::Impl& model;
  const GeneratorParams params;      // max_new_tokens checked
  const TemperatureSampler sampler;  // temperature, method and candidates checked
  std::vector<TokenIds> rows;        // the prompts, checked and filled to whole chunks
  std::vector<RandomStream> rngs;    // one per row, from the checked streams
  std::vector<RandomStream*> rng_of_row;  // the same, as the shared samplers take them
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

// Impl stays where it was made (Generator holds it by pointer), so these pointers stay valid.
std::vector<RandomStream*> pointers(std::vector<RandomStream>& rngs) {
  std::vector<RandomStream*> result;
  for (RandomStream& rng : rngs) result.push_back(&rng);
  return result;
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
      rng_of_row(pointers(rngs)),
      batch(left_pad(rows, model.manifest.chunk_size, model.manifest.pad_id)),
      state(model, rows.size(), cache_capacity(rows, batch.width, model.manifest.chunk_size, params.max_new_tokens,
                                               model.manifest.max_context)),
      position(rows.size()),
      tokens(rows.size()),
      reasons(rows.size()) {
  for (size_t row = 0; row < rows.size(); ++row) position[row] = batch.position_ids[(row + 1) * batch.width - 1];
}

TokenIds Generator::Impl::accept(size_t row, const Chunk& chunk) {
  Accepted accepted = accept_chunk(tokens[row], chunk, params, model.manifest, position[row]);
  tokens[row].insert(tokens[row].end(), accepted.kept.begin(), accepted.kept.end());
  if (reasons[row].empty()) reasons[row] = accepted.reason;
  return std::move(accepted.kept);
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
    g.chunks = m.kind == "calm" ? sample_chunks(g.model, g.sampler, g.last, g.rng_of_row, finished)
                                : sample_tokens(g.last, m.vocab_size, g.sampler.n(), g.rng_of_row, finished, m.pad_id);
  } catch (const Ort::Exception& e) {
    throw graph_error(g.model, e);
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
