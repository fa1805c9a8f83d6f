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

// Runs `body(ctx)` as every thread of a launch of `grid_x` x `grid_y` blocks of `block` threads,
// block after block. `body` calls one kernel entry point. One launch at a time per process.
extern "C" void preftune_emu_launch(unsigned grid_x, unsigned grid_y, unsigned block,
                                    void (*body)(void*), void* ctx) {
    static std::mutex one_at_a_time;
    std::lock_guard<std::mutex> lock(one_at_a_time);
    std::barrier<> bar(block);
    emu::bar = &bar;
    emu::exchange.assign(block, 0.0);
    emu::block_dim = dim3{block, 1, 1};
    emu::grid_dim = dim3{grid_x, grid_y, 1};
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&bar, grid_x, grid_y, body, ctx, t] {
            emu::thread_idx = dim3{t, 0, 0};
            for (unsigned y = 0; y < grid_y; ++y) {
                for (unsigned x = 0; x < grid_x; ++x) {
                    emu::block_idx = dim3{x, y, 0};
                    body(ctx);
                    bar.arrive_and_wait();  // the next block reuses the `__shared__` arrays
                }
            }
        });
    }
    for (auto& th : threads) th.join();
}
