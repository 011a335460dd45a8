/* New-TCP-connection load generator for the dataplane benchmark.
 *
 *   loadgen server ADDR PORT WORKERS        accept and close, WORKERS processes
 *   loadgen client ADDR PORT SECONDS PROCS  connect/close for SECONDS, PROCS processes;
 *                                           prints connections per second
 *
 * C and several processes so the generator is not what limits the rate. The
 * client closes with SO_LINGER 0 (RST): no TIME_WAIT, so the port range never
 * runs dry; the router's conntrack entries go to CLOSE and expire in 10 s.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int serve(struct sockaddr_in *sa, int workers) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)sa, sizeof *sa) || listen(s, 4096)) {
        perror("bind/listen");
        return 1;
    }
    /* Announce before forking: the workers share the listening socket. */
    printf("ready\n");
    fflush(stdout);
    for (int w = 1; w < workers; w++)
        if (fork() == 0) break;
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c >= 0) close(c);
    }
}

static long connect_loop(struct sockaddr_in *sa, double seconds) {
    struct linger lg = {1, 0};
    long n = 0;
    double end = now() + seconds;
    while (now() < end) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        if (c < 0) continue;
        setsockopt(c, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        struct timeval tv = {1, 0};
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(c, (struct sockaddr *)sa, sizeof *sa) == 0) n++;
        close(c);
    }
    return n;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: loadgen server ADDR PORT WORKERS | client ADDR PORT SECONDS PROCS\n");
        return 2;
    }
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
    if (inet_pton(AF_INET, argv[2], &sa.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", argv[2]);
        return 2;
    }
    if (strcmp(argv[1], "server") == 0) return serve(&sa, atoi(argv[4]));
    if (strcmp(argv[1], "client") != 0 || argc < 6) return 2;
    double seconds = atof(argv[4]);
    int procs = atoi(argv[5]), fds[64][2];
    if (procs < 1 || procs > 64) return 2;
    for (int p = 0; p < procs; p++) {
        if (pipe(fds[p])) return 1;
        if (fork() == 0) {
            long n = connect_loop(&sa, seconds);
            if (write(fds[p][1], &n, sizeof n) != sizeof n) _exit(1);
            _exit(0);
        }
        close(fds[p][1]);
    }
    long total = 0;
    for (int p = 0; p < procs; p++) {
        long n = 0;
        if (read(fds[p][0], &n, sizeof n) == sizeof n) total += n;
        wait(NULL);
    }
    printf("%.1f\n", total / seconds);
    return 0;
}
