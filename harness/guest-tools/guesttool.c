/*
 * guesttool: the one static binary the test guests run besides busybox.
 *
 * Why one C program rather than shell: the balloon scenarios need exact
 * control over which guest pages exist, what they contain and when they are
 * freed, and the harness needs a command channel that cannot be confused by
 * terminal echo, line editing or the OOM killer.  Busybox shell cannot give
 * either reliably.
 *
 * Subcommands (sizes in MiB):
 *   init                 PID 1: run /etc/bd/init.sh, reap orphans, power off
 *                        when it exits.  Also selected when argv[0] is "init".
 *   agent TTY            serve the harness's command channel on TTY.
 *   hold MIB [SEED]      fill MIB with a per-page checksummed pattern and stay
 *                        alive; SIGUSR1 verifies and prints one VERIFY line.
 *   dirty MIB            allocate, write every page, free, exit.
 *   fragment MIB         allocate MIB page by page, free every other page,
 *                        keep the rest until killed (physical fragmentation).
 *   alloc MIB [STEP]     allocate and touch MIB (STEP MiB at a time, printing
 *                        progress) and hold it until killed (OOM scenarios).
 *
 * Command-channel protocol (agent), all lines end in '\n':
 *   harness -> guest:  "RUN <id> <timeout_s> <nbytes>\n" then nbytes of script
 *   guest -> harness:  "\036BD-BEGIN <id>\n", the command's raw output,
 *                      "\n\036BD-END <id> <status>\n"
 *   <status> is the exit code, 128+signal if killed, or 124 on timeout.
 *   At start the agent prints "\036BD-READY\n".
 *   The script runs as "/bin/sh SCRIPTFILE" in its own session, stdin
 *   /dev/null, stdout/stderr the channel itself, oom_score_adj reset to 0
 *   (the agent and init protect themselves with -1000).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)

static long page_size;

static void die(const char *what)
{
    fprintf(stderr, "guesttool: %s: %s\n", what, strerror(errno));
    exit(2);
}

static unsigned long parse_mib(const char *s)
{
    char *end;
    unsigned long v = strtoul(s, &end, 10);
    if (*end || v == 0) {
        fprintf(stderr, "guesttool: bad size '%s' (MiB)\n", s);
        exit(2);
    }
    return v;
}

static void *map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return p;
}

static void set_oom_adj(const char *value)
{
    int fd = open("/proc/self/oom_score_adj", O_WRONLY);
    if (fd >= 0) {
        if (write(fd, value, strlen(value)) < 0) { /* best effort */ }
        close(fd);
    }
}

/* ------------------------------------------------------------------ pattern */

/*
 * Every 64-bit word of page i is a function of (seed, i, word index), and the
 * first words spell out the page index and the seed.  A page the host dropped
 * (reads back as zeros) or swapped with another page is detected.
 */
static inline uint64_t mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

#define PAGE_MAGIC 0x42414c4c4f4f4e44ULL /* "BALLOOND" */

static void fill_page(uint64_t *w, size_t words, uint64_t idx, uint64_t seed)
{
    uint64_t base = mix(seed ^ (idx * 0x9e3779b97f4a7c15ULL));
    w[0] = PAGE_MAGIC;
    w[1] = idx;
    w[2] = seed;
    for (size_t k = 3; k < words; k++)
        w[k] = base + k * 0x2545f4914f6cdd1dULL;
}

/* 0 = good, 1 = all zero, 2 = other corruption */
static int check_page(const uint64_t *w, size_t words, uint64_t idx, uint64_t seed)
{
    uint64_t base = mix(seed ^ (idx * 0x9e3779b97f4a7c15ULL));
    int bad = w[0] != PAGE_MAGIC || w[1] != idx || w[2] != seed;
    for (size_t k = 3; !bad && k < words; k++)
        bad = w[k] != base + k * 0x2545f4914f6cdd1dULL;
    if (!bad)
        return 0;
    for (size_t k = 0; k < words; k++)
        if (w[k])
            return 2;
    return 1;
}

static volatile sig_atomic_t got_usr1, got_term;

static void on_usr1(int sig) { (void)sig; got_usr1 = 1; }
static void on_term(int sig) { (void)sig; got_term = 1; }

static int cmd_hold(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: guesttool hold MIB [SEED]\n");
        return 2;
    }
    unsigned long mib = parse_mib(argv[0]);
    uint64_t seed = argc > 1 ? strtoull(argv[1], NULL, 0) : (uint64_t)getpid() * 2654435761ULL;
    size_t len = mib * MIB, pages = len / page_size, words = page_size / 8;
    uint8_t *mem = map_anon(len);

    struct sigaction sa = { 0 };
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    for (size_t i = 0; i < pages; i++)
        fill_page((uint64_t *)(mem + i * page_size), words, i, seed);
    printf("HOLD READY pid=%d pages=%zu seed=%llu\n", getpid(), pages,
           (unsigned long long)seed);
    fflush(stdout);

    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, &old);
    for (;;) {
        while (!got_usr1 && !got_term)
            sigsuspend(&old);
        if (got_term)
            break;
        got_usr1 = 0;
        size_t zero = 0, other = 0, first_bad = (size_t)-1;
        for (size_t i = 0; i < pages; i++) {
            int r = check_page((const uint64_t *)(mem + i * page_size), words, i, seed);
            if (r == 1)
                zero++;
            else if (r == 2)
                other++;
            if (r && first_bad == (size_t)-1)
                first_bad = i;
        }
        if (zero + other == 0)
            printf("VERIFY OK pages=%zu\n", pages);
        else
            printf("VERIFY FAIL bad=%zu zero=%zu other=%zu first=%zu pages=%zu\n",
                   zero + other, zero, other, first_bad, pages);
        fflush(stdout);
    }
    printf("HOLD EXIT\n");
    return 0;
}

static int cmd_dirty(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: guesttool dirty MIB\n");
        return 2;
    }
    size_t len = parse_mib(argv[0]) * MIB;
    uint8_t *mem = map_anon(len);
    for (size_t off = 0; off < len; off += page_size)
        memset(mem + off, 0xa5, page_size);
    munmap(mem, len);
    printf("DIRTY OK mib=%zu\n", len / MIB);
    return 0;
}

static void wait_for_term(void)
{
    struct sigaction sa = { 0 };
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    while (!got_term)
        pause();
}

static int cmd_fragment(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: guesttool fragment MIB\n");
        return 2;
    }
    size_t len = parse_mib(argv[0]) * MIB, pages = len / page_size;
    uint8_t *mem = map_anon(len);
    /* Fault pages in one by one so they come from the buddy allocator in
     * order, then give every other one back.  MADV_DONTNEED frees the page
     * without splitting the mapping (munmap would need one VMA per hole and
     * hit vm.max_map_count on large sizes). */
    madvise(mem, len, MADV_NOHUGEPAGE);    /* 4 KiB pages, or nothing to fragment */
    for (size_t i = 0; i < pages; i++)
        mem[i * page_size] = (uint8_t)(i | 1);
    size_t freed = 0;
    for (size_t i = 0; i < pages; i += 2) {
        if (madvise(mem + i * page_size, page_size, MADV_DONTNEED) == 0)
            freed++;
    }
    printf("FRAGMENT READY pid=%d kept=%zu freed=%zu\n", getpid(), pages - freed, freed);
    fflush(stdout);
    wait_for_term();
    return 0;
}

static int cmd_alloc(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: guesttool alloc MIB [STEP_MIB]\n");
        return 2;
    }
    size_t mib = parse_mib(argv[0]);
    size_t step = argc > 1 ? parse_mib(argv[1]) : 0;
    size_t done = 0;
    while (done < mib) {
        size_t chunk = step ? step : mib;
        if (chunk > mib - done)
            chunk = mib - done;
        uint8_t *mem = map_anon(chunk * MIB);
        for (size_t off = 0; off < chunk * MIB; off += page_size)
            mem[off] = 0x5a;
        done += chunk;
        if (step) {
            printf("ALLOC PROGRESS mib=%zu\n", done);
            fflush(stdout);
        }
    }
    printf("ALLOC READY pid=%d mib=%zu\n", getpid(), done);
    fflush(stdout);
    wait_for_term();
    return 0;
}

/* -------------------------------------------------------------------- agent */

static int chan = -1;

static void chan_write(const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(chan, buf, len);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            _exit(3);
        }
        buf += n;
        len -= (size_t)n;
    }
}

static void chan_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void chan_printf(const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n > 0)
        chan_write(buf, (size_t)n < sizeof buf ? (size_t)n : sizeof buf - 1);
}

/* Read one byte; exits the agent when the channel is gone. */
static int chan_getc(void)
{
    unsigned char c;
    for (;;) {
        ssize_t n = read(chan, &c, 1);
        if (n == 1)
            return c;
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0) {      /* hang-up: wait a bit and retry (tty reopen) */
            usleep(100000);
            continue;
        }
        _exit(3);
    }
}

static int chan_read_exact(char *buf, size_t len)
{
    while (len) {
        ssize_t n = read(chan, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int run_script(const char *path, double timeout)
{
    pid_t pid = fork();
    if (pid < 0)
        return 125;
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        set_oom_adj("0");
        int devnull = open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(chan, 1);
        dup2(chan, 2);
        if (devnull > 2)
            close(devnull);
        if (chan > 2)
            close(chan);
        signal(SIGPIPE, SIG_DFL);
        execl("/bin/sh", "sh", path, (char *)NULL);
        _exit(127);
    }
    double deadline = timeout > 0 ? now_s() + timeout : 0;
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    for (;;) {
        int st;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            if (WIFEXITED(st))
                return WEXITSTATUS(st);
            if (WIFSIGNALED(st))
                return 128 + WTERMSIG(st);
            return 125;
        }
        if (r < 0 && errno != EINTR)
            return 125;
        if (deadline && now_s() > deadline) {
            kill(-pid, SIGKILL);
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            return 124;
        }
        /* SIGCHLD is blocked in the agent: sleep until a child changes
         * state or 200 ms pass (to check the deadline). */
        struct timespec ts = { 0, 200 * 1000 * 1000 };
        sigtimedwait(&chld, NULL, &ts);
    }
}

static int cmd_agent(int argc, char **argv)
{
    if (argc < 1) {
        fprintf(stderr, "usage: guesttool agent TTY\n");
        return 2;
    }
    set_oom_adj("-1000");
    signal(SIGPIPE, SIG_IGN);
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    chan = open(argv[0], O_RDWR | O_NOCTTY);
    if (chan < 0)
        die(argv[0]);
    struct termios t;
    if (tcgetattr(chan, &t) == 0) {
        cfmakeraw(&t);
        t.c_cflag |= CLOCAL;
        cfsetispeed(&t, B115200);
        cfsetospeed(&t, B115200);
        tcsetattr(chan, TCSANOW, &t);
    }
    mkdir("/tmp/.bd", 0700);
    chan_printf("\036BD-READY\n");
    char line[256];
    for (;;) {
        size_t n = 0;
        int c;
        while ((c = chan_getc()) != '\n') {
            if (n < sizeof line - 1)
                line[n++] = (char)c;
        }
        line[n] = 0;
        char id[64];
        double timeout;
        size_t nbytes;
        if (sscanf(line, "RUN %63s %lf %zu", id, &timeout, &nbytes) != 3) {
            if (n)
                chan_printf("\036BD-ERROR bad request\n");
            continue;
        }
        char *script = malloc(nbytes + 1);
        if (!script || chan_read_exact(script, nbytes) < 0) {
            chan_printf("\036BD-ERROR short read\n");
            free(script);
            continue;
        }
        char path[128];
        snprintf(path, sizeof path, "/tmp/.bd/cmd-%s.sh", id);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int ok = fd >= 0 && write(fd, script, nbytes) == (ssize_t)nbytes;
        if (fd >= 0)
            close(fd);
        free(script);
        chan_printf("\036BD-BEGIN %s\n", id);
        int status = ok ? run_script(path, timeout) : 126;
        unlink(path);
        chan_printf("\n\036BD-END %s %d\n", id, status);
    }
}

/* --------------------------------------------------------------------- init */

static int cmd_init(void)
{
    set_oom_adj("-1000");
    pid_t child = fork();
    if (child == 0) {
        execl("/bin/sh", "sh", "/etc/bd/init.sh", (char *)NULL);
        _exit(127);
    }
    for (;;) {
        int st;
        pid_t r = wait(&st);
        if (r == child || (r < 0 && errno == ECHILD))
            break;
    }
    fprintf(stderr, "bd-init: init script exited; powering off\n");
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

int main(int argc, char **argv)
{
    page_size = sysconf(_SC_PAGESIZE);
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *base = strrchr(argv[0], '/');
    base = base ? base + 1 : argv[0];
    if (strcmp(base, "init") == 0 || getpid() == 1)
        return cmd_init();
    if (argc < 2) {
        fprintf(stderr, "usage: guesttool {hold|dirty|fragment|alloc|agent|init} ...\n");
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "hold"))
        return cmd_hold(argc - 2, argv + 2);
    if (!strcmp(cmd, "dirty"))
        return cmd_dirty(argc - 2, argv + 2);
    if (!strcmp(cmd, "fragment"))
        return cmd_fragment(argc - 2, argv + 2);
    if (!strcmp(cmd, "alloc"))
        return cmd_alloc(argc - 2, argv + 2);
    if (!strcmp(cmd, "agent"))
        return cmd_agent(argc - 2, argv + 2);
    if (!strcmp(cmd, "init"))
        return cmd_init();
    fprintf(stderr, "guesttool: unknown command %s\n", cmd);
    return 2;
}
