// The emulated-kernel test program (scripts/test_kernels_emu.sh builds and runs it).
//   test_kernels_emu [kernels] [attention] [emu] [--quick] [--case NAME]
//       no group: all of them; --quick: without the long attention case; --case: only the
//       attention cases whose name contains NAME
//   test_kernels_emu --death <case>                          (one emulator failure check)
// Exit status 1 when any check fails.
#include <cstdio>
#include <cstring>
#include <string>

void run_kernel_tests();
void run_attention_tests(bool quick, const char* filter);
void run_emu_tests();
int run_death(const char* which);
int test_failures();
int test_checks();

int main(int argc, char** argv) {
    bool kernels = false, attention = false, emu = false, quick = false;
    const char* filter = nullptr;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--death" && i + 1 < argc) return run_death(argv[i + 1]);
        if (a == "--case" && i + 1 < argc) {
            filter = argv[++i];
            continue;
        }
        if (a == "kernels") kernels = true;
        else if (a == "attention") attention = true;
        else if (a == "emu") emu = true;
        else if (a == "--quick") quick = true;
        else {
            std::fprintf(stderr, "usage: %s [kernels] [attention] [emu] [--quick] [--case NAME] | --death <case>\n", argv[0]);
            return 2;
        }
    }
    if (!kernels && !attention && !emu) kernels = attention = emu = true;
    if (emu) run_emu_tests();
    if (kernels) run_kernel_tests();
    if (attention) run_attention_tests(quick, filter);
    std::printf("\n%d checks, %d failed\n", test_checks(), test_failures());
    return test_failures() ? 1 : 0;
}
