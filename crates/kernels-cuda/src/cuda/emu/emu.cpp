// The emulator's launcher (see emu.h) and the kernels, compiled for the host.
#include <barrier>
#include <mutex>
#include <thread>
#include <vector>

#include "emu.h"
#include "../preftune.cu"

namespace emu {
thread_local dim3 thread_idx;
thread_local dim3 block_idx;
dim3 block_dim;
dim3 grid_dim;
static std::barrier<>* bar;
static std::vector<double> exchange;
void sync() { bar->arrive_and_wait(); }
double* slots() { return exchange.data(); }
}  // namespace emu

// Runs `body(ctx)` as every thread of a `grid` x `block` launch (1-D), block after block.
// `body` calls one kernel entry point. One launch at a time per process.
extern "C" void preftune_emu_launch(unsigned grid, unsigned block, void (*body)(void*), void* ctx) {
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> lock(one_at_a_time);
    std::barrier<> bar(block);
    emu::bar = &bar;
    emu::exchange.assign(block, 0.0);
    emu::block_dim = dim3{block, 1, 1};
    emu::grid_dim = dim3{grid, 1, 1};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&bar, grid, body, ctx, t] {
            emu::thread_idx = dim3{t, 0, 0};
            for (unsigned b = 0; b < grid; ++b) {
                emu::block_idx = dim3{b, 0, 0};
                body(ctx);
                bar.arrive_and_wait();  // the next block reuses the `__shared__` arrays
            }
        });
    }
    for (auto& th : threads) th.join();
}
