// Runs a schedule of arrivals and cancellations through an Engine, as tests/test_engine.py's _drive
// does in Python: at each step the requests that arrive are added (in order; request i, counted from 0
// in the order of the ARRIVE lines, gets id i), then the cancellations, then the run ends once nothing
// is left and every arrival is past, else the Engine steps. Prints one line per output of each step,
// "STEP ID: ids", with " -> REASON" once the request ended; then each request generated alone by a
// Generator, "alone ID: ids". Every request has stop_at_eos off. pytest runs the Python Engine on the
// same schedule and compares.
//
//   engine_schedule PKG MAX_BATCH BATCHING < SCHEDULE
//
// SCHEDULE, one line each:   ARRIVE STEP MAX_NEW_TOKENS TEMPERATURE SEED PROMPT TEXT...
//                            CANCEL STEP REQUEST
#include <calm_edge.hpp>

#include <algorithm>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct Arrival {
  int step;
  std::string prompt;
  calm_edge::GeneratorParams params;
};

struct Schedule {
  std::vector<Arrival> arrivals;
  std::multimap<int, uint64_t> cancels;  // step -> request
};

Schedule read_schedule(std::istream& in) {
  Schedule schedule;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string kind;
    if (!(fields >> kind)) continue;
    if (kind == "ARRIVE") {
      Arrival arrival;
      calm_edge::GeneratorParams& params = arrival.params;
      if (!(fields >> arrival.step >> params.max_new_tokens >> params.temperature >> params.seed) ||
          !std::getline(fields >> std::ws, arrival.prompt))
        throw std::runtime_error("malformed schedule line: " + line);
      params.stop_at_eos = false;
      schedule.arrivals.push_back(arrival);
    } else if (kind == "CANCEL") {
      int step;
      uint64_t request;
      if (!(fields >> step >> request)) throw std::runtime_error("malformed schedule line: " + line);
      schedule.cancels.emplace(step, request);
    } else {
      throw std::runtime_error("unknown schedule line: " + line);
    }
  }
  return schedule;
}

void print_ids(const calm_edge::TokenIds& ids) {
  for (int64_t id : ids) std::cout << " " << id;
}

void run(const calm_edge::Model& model, calm_edge::Engine& engine, size_t max_batch, const Schedule& schedule) {
  int last_arrival = 0;
  for (const Arrival& arrival : schedule.arrivals) last_arrival = std::max(last_arrival, arrival.step);
  std::set<uint64_t> ended;
  for (int step = 0; step < 500; ++step) {
    for (size_t index = 0; index < schedule.arrivals.size(); ++index) {
      const Arrival& arrival = schedule.arrivals[index];
      if (arrival.step == step) engine.add_request(model.tokenizer().encode(arrival.prompt), arrival.params, index);
    }
    const auto [first, end] = schedule.cancels.equal_range(step);
    for (auto cancel = first; cancel != end; ++cancel) engine.cancel(cancel->second);
    if (!engine.has_work() && step > last_arrival) break;
    for (const calm_edge::RequestOutput& output : engine.step()) {
      if (ended.count(output.request_id))
        throw std::runtime_error("request " + std::to_string(output.request_id) + " was reported after it ended");
      std::cout << step << " " << output.request_id << ":";
      print_ids(output.new_ids);
      if (output.finished()) {
        std::cout << " -> " << output.stop_reason;
        ended.insert(output.request_id);
      }
      std::cout << "\n";
    }
    if (engine.running() > max_batch)
      throw std::runtime_error(std::to_string(engine.running()) + " rows running, more than max_batch");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: engine_schedule PKG MAX_BATCH BATCHING < SCHEDULE\n";
    return 2;
  }
  try {
    calm_edge::ModelOptions options;
    options.threads = 1;
    const calm_edge::Model model(argv[1], options);
    const size_t max_batch = std::stoul(argv[2]);
    calm_edge::Engine engine(model, max_batch, argv[3]);
    const Schedule schedule = read_schedule(std::cin);
    run(model, engine, max_batch, schedule);
    for (size_t index = 0; index < schedule.arrivals.size(); ++index) {
      const Arrival& arrival = schedule.arrivals[index];
      std::cout << "alone " << index << ":";
      print_ids(calm_edge::generate_tokens(model, {model.tokenizer().encode(arrival.prompt)}, arrival.params)[0]);
      std::cout << "\n";
    }
  } catch (const std::exception& e) {
    std::cerr << "engine_schedule: error: " << e.what() << "\n";
    return 1;
  }
}
