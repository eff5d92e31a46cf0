// calm_edge::Engine: in-flight (continuous) batching over one Model, step for step the Engine of
// runtime/engine.py (its docstring gives the why of each rule), so that both give the same tokens.
//
// - add_request checks a request (the Generator's checks, and one random stream) and queues it.
// - step() first reports the requests cancelled since the last step. Then it either admits queued
//   requests into free rows (continuous: as many as rows are free; static: only into an empty
//   batch): their prompts are prefilled together, left-padded, in a StepState of their own; each
//   newcomer's cache is placed right-aligned into the next row of the batch's SlotCache (columns are
//   added on the left when the newcomers are wider) and each samples its first chunk. Or, with no
//   newcomers, every row advances: one step-graph call on the chunks the rows chose (pad chunks for
//   the ended rows a static batch keeps), then the rows still running sample their next chunk (CALM)
//   or token (AR). Rows that share a sampler (temperature, method, candidates) are sampled together,
//   each from its own RandomStream, by the same code as a Generator's rows (generation.hpp).
// - An ended row leaves the batch at once (continuous) or when every row has ended (static): the
//   last row moves into its place, so the step graph always runs on exactly the rows in the batch.
// - Before a row-advancing step, the left columns that no row attends are dropped when the cache
//   would overflow or they are a quarter of it or more, so a stream of requests never outgrows the
//   cache's max_context + 1 positions.
#include <algorithm>
#include <deque>
#include <optional>

#include "calm_edge.hpp"
#include "generation.hpp"
#include "kv_cache.hpp"
#include "model_impl.hpp"
#include "sampling.hpp"
#include "step_state.hpp"

namespace calm_edge {
namespace {

// The batch's attention mask, [rows, width] row-major: 1 where a row has an entry in that column of
// the cache. Between steps its width is the cache's length.
class Mask {
 public:
  size_t width() const { return width_; }
  const TokenIds& values() const { return values_; }

  // The first column that some row of `live` attends (width() if none).
  size_t first_used(const std::vector<bool>& live) const {
    for (size_t column = 0; column < width_; ++column)
      for (size_t row = 0; row < rows_; ++row)
        if (live[row] && values_[row * width_ + column]) return column;
    return width_;
  }

  // Keep the newest `width` columns, zeros on the left where there were none (as SlotCache::resize).
  void resize(size_t width) {
    const size_t keep = std::min(width, width_);
    TokenIds resized(rows_ * width, 0);
    for (size_t row = 0; row < rows_; ++row)
      std::copy_n(values_.begin() + (row + 1) * width_ - keep, keep, resized.begin() + (row + 1) * width - keep);
    values_.swap(resized);
    width_ = width;
  }

  // The column of the step about to run, which every row attends.
  void append_ones() {
    TokenIds wider(rows_ * (width_ + 1), 1);
    for (size_t row = 0; row < rows_; ++row)
      std::copy_n(values_.begin() + row * width_, width_, wider.begin() + row * (width_ + 1));
    values_.swap(wider);
    ++width_;
  }

  // Rows of `width` <= width() columns ([count, width] row-major), right-aligned after the others.
  void append_rows(const TokenIds& rows, size_t width) {
    for (size_t row = 0; row < rows.size() / width; ++row) {
      values_.insert(values_.end(), width_ - width, 0);
      values_.insert(values_.end(), rows.begin() + row * width, rows.begin() + (row + 1) * width);
      ++rows_;
    }
  }

  void move_row(size_t source, size_t target) {
    std::copy_n(values_.begin() + source * width_, width_, values_.begin() + target * width_);
  }

  void remove_last_row() {
    --rows_;
    values_.resize(rows_ * width_);
  }

  void clear() {
    values_.clear();
    rows_ = width_ = 0;
  }

 private:
  TokenIds values_;
  size_t rows_ = 0, width_ = 0;
};

struct Request {
  Request(uint64_t id_, TokenIds prompt_, const GeneratorParams& params_, TemperatureSampler sampler_,
          RandomStream rng_)
      : id(id_), prompt(std::move(prompt_)), params(params_), sampler(std::move(sampler_)), rng(rng_) {}

  uint64_t id;
  TokenIds prompt;  // filled to whole chunks
  GeneratorParams params;
  TemperatureSampler sampler;
  RandomStream rng;
  TokenIds tokens;
  std::string stop_reason;  // "" while it runs
  int64_t position = 0;     // the row's last position so far
  Chunk chunk;              // chosen at the last step, fed to the step graph at the next
  bool reported = false;    // whether an output has told the caller that it ended
};

const std::string& checked_batching(const std::string& batching) {
  if (batching != "continuous" && batching != "static")
    throw Error("batching='" + batching + "': choose one of continuous, static");
  return batching;
}

size_t checked_max_batch(size_t max_batch) {
  if (max_batch < 1) throw Error("max_batch=" + std::to_string(max_batch) + " must be a whole number of at least 1");
  return max_batch;
}

TemperatureSampler checked_sampler(const GeneratorParams& params) {
  check_params(params);
  return TemperatureSampler(params.temperature, params.method, params.candidates);
}

bool same_sampler(const GeneratorParams& a, const GeneratorParams& b) {
  return a.temperature == b.temperature && a.method == b.method && a.candidates == b.candidates;
}

}  // namespace

struct Engine::Impl {
  Impl(const Model::Impl& model, size_t max_batch, const std::string& batching);

  uint64_t add(const TokenIds& prompt, const GeneratorParams& params, std::optional<uint64_t> request_id);
  bool cancel(uint64_t request_id);
  std::vector<RequestOutput> step();

  void retire();
  void leave(const std::vector<size_t>& indices);
  std::vector<Request> admit();
  std::vector<float> prefill(std::vector<Request> newcomers);
  std::vector<float> advance();
  std::vector<float> run(const TokenIds& input_ids, const TokenIds& position_ids);
  std::vector<Chunk> sample(const std::vector<float>& last, const std::vector<size_t>& indices);

  // Members in the order of the checks, which the constructor runs as the Python runtime does.
  const Model::Impl& model;
  const std::string batching;
  const size_t max_batch;
  const size_t output_width;  // the step graph's output per row: hidden size (CALM) or vocabulary size (AR)
  SlotCache cache;
  Mask mask;
  std::vector<Request> rows;  // the running requests, in the cache's row order
  std::deque<Request> queue;  // requests waiting for a row
  uint64_t next_id = 0;
  std::vector<float> output;  // the step graph's output for up to max_batch rows, allocated once
};

Engine::Impl::Impl(const Model::Impl& model_, size_t max_batch_, const std::string& batching_)
    : model(model_),
      batching(checked_batching(batching_)),
      max_batch(checked_max_batch(max_batch_)),
      output_width(model.manifest.kind == "ar" ? model.manifest.vocab_size : model.manifest.hidden_size),
      // A row spans at most max_context positions; one more column is the step being computed.
      cache(model.past_names.size(), max_batch, model.manifest.num_kv_heads, model.manifest.head_dim,
            model.manifest.max_context + 1),
      output(max_batch * output_width) {}

uint64_t Engine::Impl::add(const TokenIds& prompt, const GeneratorParams& params,
                           std::optional<uint64_t> request_id) {
  const PackageManifest& m = model.manifest;
  TemperatureSampler sampler = checked_sampler(params);
  check_prompts({prompt}, m.chunk_size, m.max_context);
  if (params.streams.size() > 1)
    throw Error(std::to_string(params.streams.size()) + " random streams for one request; give one stream (or none)");
  const uint64_t stream = params.streams.empty() ? 0 : params.streams[0];
  const uint64_t id = request_id ? *request_id : next_id++;
  auto has_id = [&](const Request& r) { return r.id == id; };
  if (std::any_of(rows.begin(), rows.end(), has_id) || std::any_of(queue.begin(), queue.end(), has_id))
    throw Error("request id " + std::to_string(id) + " is already in use; give each request its own id");
  queue.emplace_back(id, fill_to_chunks(prompt, m), params, std::move(sampler), RandomStream(params.seed, stream));
  return id;
}

bool Engine::Impl::cancel(uint64_t request_id) {
  auto running = [&](const Request& r) { return r.id == request_id && r.stop_reason.empty(); };
  auto queued = std::find_if(queue.begin(), queue.end(), running);
  if (queued != queue.end()) {
    queued->stop_reason = "cancelled";
    return true;
  }
  auto row = std::find_if(rows.begin(), rows.end(), running);
  if (row == rows.end()) return false;
  row->stop_reason = "cancelled";  // it leaves the batch at the next step
  return true;
}

std::vector<RequestOutput> Engine::Impl::step() {
  std::vector<RequestOutput> outputs;
  std::deque<Request> still_queued;
  for (Request& r : queue) {
    if (r.stop_reason.empty())
      still_queued.push_back(std::move(r));
    else
      outputs.push_back({r.id, {}, r.stop_reason});
  }
  queue.swap(still_queued);
  for (Request& r : rows) {
    if (!r.stop_reason.empty() && !r.reported) {  // cancelled since the last step
      r.reported = true;
      outputs.push_back({r.id, {}, r.stop_reason});
    }
  }
  retire();

  std::vector<size_t> indices;  // the rows sampled at this step
  std::vector<float> last;      // their step outputs, in the order of `indices`
  std::vector<Chunk> chunks;
  try {
    std::vector<Request> newcomers = admit();
    if (!newcomers.empty()) {
      const size_t first = rows.size();
      last = prefill(std::move(newcomers));
      for (size_t index = first; index < rows.size(); ++index) indices.push_back(index);
    } else {
      for (size_t index = 0; index < rows.size(); ++index)
        if (rows[index].stop_reason.empty()) indices.push_back(index);
      if (indices.empty()) return outputs;
      const std::vector<float> all = advance();
      for (size_t index : indices)
        last.insert(last.end(), all.begin() + index * output_width, all.begin() + (index + 1) * output_width);
    }
    chunks = sample(last, indices);
  } catch (const Ort::Exception& e) {
    throw graph_error(model, e);
  }
  for (size_t p = 0; p < indices.size(); ++p) {
    Request& request = rows[indices[p]];
    Accepted accepted = accept_chunk(request.tokens, chunks[p], request.params, model.manifest, request.position);
    request.tokens.insert(request.tokens.end(), accepted.kept.begin(), accepted.kept.end());
    request.chunk = std::move(chunks[p]);
    request.stop_reason = accepted.reason;
    request.reported = !accepted.reason.empty();
    outputs.push_back({request.id, std::move(accepted.kept), accepted.reason});
  }
  retire();
  return outputs;
}

// Ended rows leave the batch: at once (continuous), or all together when the last ends (static).
void Engine::Impl::retire() {
  std::vector<size_t> ended;
  for (size_t index = 0; index < rows.size(); ++index)
    if (!rows[index].stop_reason.empty()) ended.push_back(index);
  if (batching == "continuous" || ended.size() == rows.size()) leave(ended);
}

// Remove rows (`indices` ascending): each gap is filled by the last row, so rows stay packed.
void Engine::Impl::leave(const std::vector<size_t>& indices) {
  for (auto it = indices.rbegin(); it != indices.rend(); ++it) {
    const size_t last = rows.size() - 1;
    if (*it != last) {
      cache.move_row(last, *it);
      mask.move_row(last, *it);
      rows[*it] = std::move(rows[last]);
    }
    rows.pop_back();
    cache.remove_last_row();
    mask.remove_last_row();
  }
  if (rows.empty()) {
    cache.clear();
    mask.clear();
  }
}

// The queued requests that get a row at this step (static batching: only into an empty batch).
std::vector<Request> Engine::Impl::admit() {
  std::vector<Request> newcomers;
  if (batching == "static" && !rows.empty()) return newcomers;
  while (rows.size() + newcomers.size() < max_batch && !queue.empty()) {
    newcomers.push_back(std::move(queue.front()));
    queue.pop_front();
  }
  return newcomers;
}

// Prefill the newcomers together and place their caches into rows at the end of the batch; returns
// their last position's step output.
std::vector<float> Engine::Impl::prefill(std::vector<Request> newcomers) {
  const PackageManifest& m = model.manifest;
  std::vector<TokenIds> prompts;
  for (const Request& request : newcomers) prompts.push_back(request.prompt);
  const PaddedBatch batch = left_pad(prompts, m.chunk_size, m.pad_id);
  const size_t width = batch.width;
  StepState state(model, newcomers.size(), width);
  std::vector<float> last = state.start(batch.input_ids, batch.attention_mask, batch.position_ids);
  if (width > cache.length()) {  // newcomers longer than the batch: columns are added on the left
    cache.resize(width);
    mask.resize(width);
  }
  const size_t row_size = static_cast<size_t>(m.num_kv_heads) * width * m.head_dim;
  for (size_t i = 0; i < newcomers.size(); ++i) {
    std::vector<const float*> entries;
    for (size_t k = 0; k < model.past_names.size(); ++k) entries.push_back(state.cache().entries(k) + i * row_size);
    cache.place(rows.size(), entries, width);
    newcomers[i].position = batch.position_ids[(i + 1) * width - 1];
    rows.push_back(std::move(newcomers[i]));
  }
  mask.append_rows(batch.attention_mask, width);
  return last;
}

// One step-graph call for every row on the chunk it chose; returns the rows' step output.
std::vector<float> Engine::Impl::advance() {
  const PackageManifest& m = model.manifest;
  // Drop the left columns that no running row attends, when the cache is full or they are many. The
  // ended rows a static batch keeps do not count: their output is never read, and their columns would
  // otherwise hold the cache past the context.
  std::vector<bool> live;
  for (const Request& request : rows) live.push_back(request.stop_reason.empty());
  const size_t first = mask.first_used(live);
  if (first && (cache.length() + 1 > cache.capacity() || first >= cache.length() / 4)) {
    cache.resize(cache.length() - first);
    mask.resize(cache.length());
  }
  const Chunk pad(m.chunk_size, m.pad_id);  // for the ended rows a static batch keeps
  TokenIds input_ids, position_ids;
  for (Request& request : rows) {
    ++request.position;
    const Chunk& next = request.stop_reason.empty() ? request.chunk : pad;
    input_ids.insert(input_ids.end(), next.begin(), next.end());
    position_ids.push_back(request.position);
  }
  mask.append_ones();
  return run(input_ids, position_ids);
}

// As StepState::run, for one new position: the cache and the output are bound straight into buffers.
std::vector<float> Engine::Impl::run(const TokenIds& input_ids, const TokenIds& position_ids) {
  const Ort::MemoryInfo& memory = model.cpu_memory;
  const auto batch = static_cast<int64_t>(rows.size());
  auto int64_tensor = [&](const TokenIds& values, size_t columns) {
    const int64_t shape[] = {batch, static_cast<int64_t>(columns)};
    return Ort::Value::CreateTensor<int64_t>(memory, const_cast<int64_t*>(values.data()), values.size(), shape, 2);
  };

  Ort::Session& session = *model.step_graph;
  Ort::IoBinding binding(session);
  binding.BindInput("input_ids", int64_tensor(input_ids, input_ids.size() / rows.size()));
  binding.BindInput("attention_mask", int64_tensor(mask.values(), mask.width()));
  binding.BindInput("position_ids", int64_tensor(position_ids, 1));
  const size_t new_length = cache.length() + 1;
  for (size_t k = 0; k < model.past_names.size(); ++k) {
    binding.BindInput(model.past_names[k].c_str(), cache.past(k, memory));
    binding.BindOutput(model.present_names[k].c_str(), cache.present(k, new_length, memory));
  }
  const bool is_ar = model.manifest.kind == "ar";
  const auto width = static_cast<int64_t>(output_width);
  const int64_t hidden_shape[] = {batch, 1, width};
  const int64_t logits_shape[] = {batch, width};
  const size_t output_size = rows.size() * output_width;
  binding.BindOutput(model.first_output.c_str(),
                     Ort::Value::CreateTensor<float>(memory, output.data(), output_size,
                                                     is_ar ? logits_shape : hidden_shape, is_ar ? 2 : 3));
  session.Run(Ort::RunOptions{nullptr}, binding);
  cache.commit(new_length);
  return std::vector<float>(output.begin(), output.begin() + output_size);
}

// The next chunk (CALM) or token (AR) of the rows `indices`, whose step outputs are `last` (in the
// order of `indices`). Rows that share a sampler are sampled together, in groups ordered by their
// first row, as the Python Engine groups them.
std::vector<Chunk> Engine::Impl::sample(const std::vector<float>& last, const std::vector<size_t>& indices) {
  const PackageManifest& m = model.manifest;
  std::vector<std::vector<size_t>> groups;  // positions into `indices`
  for (size_t p = 0; p < indices.size(); ++p) {
    const GeneratorParams& params = rows[indices[p]].params;
    auto group = std::find_if(groups.begin(), groups.end(), [&](const std::vector<size_t>& members) {
      return same_sampler(rows[indices[members[0]]].params, params);
    });
    if (group == groups.end())
      groups.push_back({p});
    else
      group->push_back(p);
  }
  std::vector<Chunk> chunks(indices.size());
  for (const std::vector<size_t>& members : groups) {
    std::vector<float> outputs;
    std::vector<RandomStream*> rngs;
    for (size_t p : members) {
      outputs.insert(outputs.end(), last.begin() + p * output_width, last.begin() + (p + 1) * output_width);
      rngs.push_back(&rows[indices[p]].rng);
    }
    const std::vector<bool> done(members.size(), false);
    const TemperatureSampler& sampler = rows[indices[members[0]]].sampler;
    std::vector<Chunk> picked = m.kind == "calm"
                                    ? sample_chunks(model, sampler, outputs, rngs, done)
                                    : sample_tokens(outputs, m.vocab_size, sampler.n(), rngs, done, m.pad_id);
    for (size_t j = 0; j < members.size(); ++j) chunks[members[j]] = std::move(picked[j]);
  }
  return chunks;
}

Engine::Engine(const Model& model, size_t max_batch, const std::string& batching)
    : impl_(std::make_unique<Impl>(model.impl(), max_batch, batching)) {}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

uint64_t Engine::add_request(const TokenIds& prompt, const GeneratorParams& params) {
  return impl_->add(prompt, params, std::nullopt);
}

uint64_t Engine::add_request(const TokenIds& prompt, const GeneratorParams& params, uint64_t request_id) {
  return impl_->add(prompt, params, request_id);
}

bool Engine::cancel(uint64_t request_id) { return impl_->cancel(request_id); }
std::vector<RequestOutput> Engine::step() { return impl_->step(); }
bool Engine::has_work() const { return !impl_->rows.empty() || !impl_->queue.empty(); }
size_t Engine::running() const { return impl_->rows.size(); }

size_t Engine::waiting() const {
  const std::deque<Request>& queue = impl_->queue;
  return std::count_if(queue.begin(), queue.end(), [](const Request& r) { return r.stop_reason.empty(); });
}

}  // namespace calm_edge
