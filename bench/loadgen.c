/*
 * loadgen.c - SOCKS5 benchmark load generator and target server.
 *
 * Written in C (epoll + threads) so that the generator is never the
 * bottleneck when measuring multi-GB/s loopback relaying: a Python asyncio
 * client would saturate a core long before the proxies under test do.
 *
 * Subcommands (all print one JSON object on stdout when done):
 *
 *   target --echo PORT --echo1 PORT --sink PORT --source PORT
 *       Echo, sink and source servers on 127.0.0.1 and ::1 (loopback only).
 *       sink:   reads an 8-byte big-endian length N, then N bytes, then
 *               answers one byte 'K' (so the client knows all data arrived).
 *       source: reads an 8-byte big-endian length N, then writes N bytes.
 *       echo:   echoes whatever it reads (small messages only).
 *       echo1:  echoes 32 bytes, then closes first.
 *
 *   bulk --proxy HOST:PORT|- --dst HOST --dport PORT --dir up|down
 *        --streams S --bytes TOTAL --cap SECONDS [--user U --pass P]
 *       S threads, each doing a SOCKS5 CONNECT then moving TOTAL/S bytes.
 *
 *   conn --proxy HOST:PORT|- --dst HOST --dport PORT --concurrency C
 *        --count N --cap SECONDS [--user U --pass P] [--close client|server]
 *       Connection-rate test: each connection is greeting (+ RFC 1929 auth)
 *       + CONNECT + one 32-byte echo round trip + close.  With
 *       "--close server" (what the harness uses, against the echo1 port) the
 *       client waits for the target's close, then closes; with the default
 *       "client" (against the echo port) the client closes first.
 *
 *   idle --proxy ... --dst ... --dport ... --count N --concurrency C
 *        --hold SECONDS
 *       Opens N CONNECTed connections (each verified by one echo), prints a
 *       "ready" JSON line, then holds them until stdin closes or the hold
 *       cap passes, then prints a final JSON line.
 *
 * "--proxy -" means connect straight to the target (the direct baseline).
 * A --dst that parses as IPv4 is sent as ATYP 1, IPv6 as ATYP 4, anything
 * else as a domain name (ATYP 3).  Every loop is bounded in count and time,
 * and alarm() kills the process if something still hangs.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (256 * 1024)
#define ECHO_LEN 32
#define IO_TIMEOUT_S 10
#define GRACE_S 5.0

/* ------------------------------------------------------------------ */
/* small helpers                                                       */
/* ------------------------------------------------------------------ */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *msg)
{
    fprintf(stderr, "loadgen: %s: %s\n", msg, strerror(errno));
    exit(2);
}

/* Raise RLIMIT_NOFILE to the hard limit: the idle test holds thousands. */
static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL, 0);
    fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void set_nodelay(int fd)
{
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void set_io_timeouts(int fd, int secs)
{
    struct timeval tv = {.tv_sec = secs, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)(v & 0xff);
        v >>= 8;
    }
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Blocking: read exactly n bytes. Returns 0 on success, -1 on EOF/error. */
static int read_full(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Blocking: write exactly n bytes. Returns 0 on success, -1 on error. */
static int write_full(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* Resolve a numeric or named host:port to a sockaddr (first result). */
static int resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len)
{
    struct addrinfo hints = {0}, *res = NULL;
    char portbuf[16];
    hints.ai_socktype = SOCK_STREAM;
    snprintf(portbuf, sizeof portbuf, "%d", port);
    if (getaddrinfo(host, portbuf, &hints, &res) != 0 || !res)
        return -1;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

/* Parse "HOST:PORT" or "[V6]:PORT". */
static int parse_hostport(const char *s, char *host, size_t hostlen, int *port)
{
    const char *colon;
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (!end || end[1] != ':')
            return -1;
        snprintf(host, hostlen, "%.*s", (int)(end - s - 1), s + 1);
        colon = end + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon)
            return -1;
        snprintf(host, hostlen, "%.*s", (int)(colon - s), s);
    }
    *port = atoi(colon + 1);
    return *port > 0 ? 0 : -1;
}

/* ------------------------------------------------------------------ */
/* options                                                             */
/* ------------------------------------------------------------------ */

struct opts {
    const char *mode;
    int direct;
    char proxy_host[256];
    int proxy_port;
    const char *dst;
    int dport;
    const char *dir;
    int streams;
    uint64_t bytes;
    double cap;
    int concurrency;
    long count;
    double hold;
    const char *user;
    const char *pass;
    int server_closes; /* conn: wait for the target's EOF instead of closing first */
    int echo_port, echo1_port, sink_port, source_port;
};

static void parse_opts(int argc, char **argv, struct opts *o)
{
    memset(o, 0, sizeof *o);
    o->mode = argc > 1 ? argv[1] : "";
    o->streams = 1;
    o->cap = 10;
    o->concurrency = 64;
    o->count = 1000;
    o->hold = 30;
    o->dir = "up";
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--proxy")) {
            if (!strcmp(v, "-"))
                o->direct = 1;
            else if (parse_hostport(v, o->proxy_host, sizeof o->proxy_host, &o->proxy_port))
                errno = EINVAL, die("bad --proxy");
        } else if (!strcmp(k, "--dst")) o->dst = v;
        else if (!strcmp(k, "--dport")) o->dport = atoi(v);
        else if (!strcmp(k, "--dir")) o->dir = v;
        else if (!strcmp(k, "--streams")) o->streams = atoi(v);
        else if (!strcmp(k, "--bytes")) o->bytes = strtoull(v, NULL, 10);
        else if (!strcmp(k, "--cap")) o->cap = atof(v);
        else if (!strcmp(k, "--concurrency")) o->concurrency = atoi(v);
        else if (!strcmp(k, "--count")) o->count = atol(v);
        else if (!strcmp(k, "--hold")) o->hold = atof(v);
        else if (!strcmp(k, "--user")) o->user = v;
        else if (!strcmp(k, "--close")) o->server_closes = !strcmp(v, "server");
        else if (!strcmp(k, "--pass")) o->pass = v;
        else if (!strcmp(k, "--echo")) o->echo_port = atoi(v);
        else if (!strcmp(k, "--echo1")) o->echo1_port = atoi(v);
        else if (!strcmp(k, "--sink")) o->sink_port = atoi(v);
        else if (!strcmp(k, "--source")) o->source_port = atoi(v);
        else {
            fprintf(stderr, "loadgen: unknown option %s\n", k);
            exit(2);
        }
    }
}

/* ------------------------------------------------------------------ */
/* SOCKS5 message building / parsing (RFC 1928, RFC 1929)              */
/* ------------------------------------------------------------------ */

/* Greeting: offer exactly one method, 0x02 if credentials given else 0x00. */
static size_t build_greeting(uint8_t *out, const struct opts *o)
{
    out[0] = 5;
    out[1] = 1;
    out[2] = o->user ? 2 : 0;
    return 3;
}

/* RFC 1929 username/password sub-negotiation request. */
static size_t build_auth(uint8_t *out, const struct opts *o)
{
    size_t ul = strlen(o->user), pl = strlen(o->pass), n = 0;
    out[n++] = 1;
    out[n++] = (uint8_t)ul;
    memcpy(out + n, o->user, ul);
    n += ul;
    out[n++] = (uint8_t)pl;
    memcpy(out + n, o->pass, pl);
    return n + pl;
}

/* CONNECT request; ATYP chosen from the textual form of the destination. */
static size_t build_connect(uint8_t *out, const char *dst, int dport)
{
    size_t n = 0;
    struct in_addr a4;
    struct in6_addr a6;
    out[n++] = 5;
    out[n++] = 1; /* CONNECT */
    out[n++] = 0; /* RSV */
    if (inet_pton(AF_INET, dst, &a4) == 1) {
        out[n++] = 1;
        memcpy(out + n, &a4, 4);
        n += 4;
    } else if (inet_pton(AF_INET6, dst, &a6) == 1) {
        out[n++] = 4;
        memcpy(out + n, &a6, 16);
        n += 16;
    } else {
        size_t dl = strlen(dst);
        out[n++] = 3;
        out[n++] = (uint8_t)dl;
        memcpy(out + n, dst, dl);
        n += dl;
    }
    out[n++] = (uint8_t)(dport >> 8);
    out[n++] = (uint8_t)(dport & 0xff);
    return n;
}

/*
 * Given the first 5 bytes of a CONNECT reply, return the full reply length
 * (VER REP RSV ATYP BND.ADDR BND.PORT) or -1 if the reply is malformed or
 * reports failure.  Reading exactly this many bytes keeps us from eating
 * relayed payload that may follow the reply.
 */
static int connect_reply_len(const uint8_t *h)
{
    if (h[0] != 5 || h[1] != 0)
        return -1;
    switch (h[3]) {
    case 1: return 4 + 4 + 2;
    case 4: return 4 + 16 + 2;
    case 3: return 4 + 1 + h[4] + 2;
    default: return -1;
    }
}

/* Why a CONNECT reply was refused, for diagnostics (RFC 1928 section 6). */
static const char *reply_error(const uint8_t *h)
{
    static const char *const reps[] = {
        "succeeded", "REP 1 general failure", "REP 2 not allowed by ruleset",
        "REP 3 network unreachable", "REP 4 host unreachable", "REP 5 connection refused",
        "REP 6 TTL expired", "REP 7 command not supported", "REP 8 address type not supported",
    };
    if (h[0] != 5)
        return "CONNECT reply with VER != 5";
    if (h[1] != 0)
        return h[1] < 9 ? reps[h[1]] : "REP unassigned";
    return "CONNECT reply with unknown ATYP";
}

/* Blocking SOCKS5 handshake used by the bulk threads; NULL or why it failed. */
static const char *socks_handshake_blocking(int fd, const struct opts *o)
{
    uint8_t buf[600];
    size_t n = build_greeting(buf, o);
    if (write_full(fd, buf, n) || read_full(fd, buf, 2))
        return "greeting: I/O error or EOF";
    if (buf[0] != 5 || buf[1] != (o->user ? 2 : 0))
        return "method not accepted";
    if (o->user) {
        n = build_auth(buf, o);
        if (write_full(fd, buf, n) || read_full(fd, buf, 2))
            return "auth: I/O error or EOF";
        if (buf[0] != 1 || buf[1] != 0)
            return "authentication rejected";
    }
    n = build_connect(buf, o->dst, o->dport);
    if (write_full(fd, buf, n) || read_full(fd, buf, 5))
        return "CONNECT: I/O error or EOF";
    int total = connect_reply_len(buf);
    if (total < 0)
        return reply_error(buf);
    if (read_full(fd, buf + 5, (size_t)total - 5))
        return "CONNECT reply truncated";
    return NULL;
}

/* The address the client's TCP connection goes to: proxy or target. */
static void first_hop(const struct opts *o, struct sockaddr_storage *ss, socklen_t *len)
{
    const char *host = o->direct ? o->dst : o->proxy_host;
    int port = o->direct ? o->dport : o->proxy_port;
    if (resolve(host, port, ss, len))
        errno = EINVAL, die("cannot resolve first hop");
}

/* ------------------------------------------------------------------ */
/* target server                                                       */
/* ------------------------------------------------------------------ */

static int listen_on(const char *ip, int port)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (resolve(ip, port, &ss, &len))
        return -1;
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ss.ss_family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&ss, len) || listen(fd, 4096)) {
        close(fd);
        return -1;
    }
    return fd;
}

static void *sink_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    uint8_t hdr[8];
    uint8_t *buf = malloc(CHUNK);
    set_io_timeouts(fd, 60);
    if (read_full(fd, hdr, 8) == 0) {
        uint64_t left = get_be64(hdr);
        while (left > 0) {
            ssize_t r = read(fd, buf, left < CHUNK ? left : CHUNK);
            if (r <= 0)
                break;
            left -= (uint64_t)r;
        }
        if (left == 0)
            write_full(fd, "K", 1);
    }
    close(fd);
    free(buf);
    return NULL;
}

static uint8_t source_buf[CHUNK];

static void *source_conn(void *arg)
{
    int fd = (int)(intptr_t)arg;
    uint8_t hdr[8];
    set_io_timeouts(fd, 60);
    if (read_full(fd, hdr, 8) == 0) {
        uint64_t left = get_be64(hdr);
        while (left > 0) {
            ssize_t w = send(fd, source_buf, left < CHUNK ? left : CHUNK, MSG_NOSIGNAL);
            if (w <= 0)
                break;
            left -= (uint64_t)w;
        }
        /* Wait for the client to close so the last bytes are not reset. */
        char c;
        while (read(fd, &c, 1) > 0)
            ;
    }
    close(fd);
    return NULL;
}

struct acceptor {
    int lfd;
    void *(*handler)(void *);
};

/* Thread-per-connection acceptor: bulk streams are few and long-lived. */
static void *accept_loop(void *arg)
{
    struct acceptor *a = arg;
    for (;;) {
        int fd = accept4(a->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE)
                continue;
            return NULL;
        }
        pthread_t t;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&at, 256 * 1024);
        if (pthread_create(&t, &at, a->handler, (void *)(intptr_t)fd))
            close(fd);
        pthread_attr_destroy(&at);
    }
}

static void start_acceptors(int port, void *(*handler)(void *))
{
    const char *ips[] = {"127.0.0.1", "::1"};
    for (int i = 0; i < 2; i++) {
        int lfd = listen_on(ips[i], port);
        if (lfd < 0) {
            if (i == 0)
                die("listen 127.0.0.1");
            continue; /* no IPv6 loopback: IPv4 is enough */
        }
        struct acceptor *a = malloc(sizeof *a);
        a->lfd = lfd;
        a->handler = handler;
        pthread_t t;
        if (pthread_create(&t, NULL, accept_loop, a))
            die("pthread_create");
        pthread_detach(t);
    }
}

/*
 * Echo servers on one epoll thread: they have to hold thousands of idle
 * connections cheaply and keep up with tens of thousands of short
 * connections per second.  Two flavours share the loop:
 *   echo  - echoes until the peer closes (idle-connection test);
 *   echo1 - echoes ECHO_LEN bytes, then closes (connection-rate test).
 * Messages are small, so a short write means the peer is misbehaving and
 * the connection is dropped.
 */
#define LISTEN_TAG (1ULL << 40)
#define ECHO1_TAG (1ULL << 41)

static void add_listeners(int ep, int port, uint64_t kind)
{
    const char *ips[] = {"127.0.0.1", "::1"};
    for (int i = 0; i < 2; i++) {
        int lfd = listen_on(ips[i], port);
        if (lfd < 0) {
            if (i == 0)
                die("listen echo");
            continue; /* no IPv6 loopback: IPv4 is enough */
        }
        set_nonblock(lfd);
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = (uint64_t)lfd | LISTEN_TAG | kind;
        epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    }
}

static void accept_all(int ep, int lfd, uint64_t kind, uint8_t *echoed)
{
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0)
            return;
        set_nodelay(c);
        echoed[c] = 0;
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = (uint64_t)c | kind;
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
    }
}

static void echo_loop(int port, int port1)
{
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    uint8_t *echoed = calloc(rl.rlim_cur, 1); /* echo1: bytes echoed so far, by fd */
    int ep = epoll_create1(EPOLL_CLOEXEC);
    add_listeners(ep, port, 0);
    add_listeners(ep, port1, ECHO1_TAG);
    struct epoll_event evs[512];
    uint8_t buf[4096];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            int fd = (int)(tag & 0xffffffffULL);
            if (tag & LISTEN_TAG) {
                accept_all(ep, fd, tag & ECHO1_TAG, echoed);
                continue;
            }
            ssize_t r = read(fd, buf, sizeof buf);
            if (r < 0 && errno == EAGAIN)
                continue;
            if (r > 0 && send(fd, buf, (size_t)r, MSG_NOSIGNAL) == r) {
                if (!(tag & ECHO1_TAG))
                    continue;
                size_t sofar = echoed[fd] + (size_t)r;
                echoed[fd] = sofar > 255 ? 255 : (uint8_t)sofar;
                if (sofar < ECHO_LEN)
                    continue;
            }
            close(fd); /* EOF, error, short write or echo1 done */
        }
    }
}

static int cmd_target(const struct opts *o)
{
    for (size_t i = 0; i < sizeof source_buf; i++)
        source_buf[i] = (uint8_t)(i * 131 + 7);
    signal(SIGPIPE, SIG_IGN);
    start_acceptors(o->sink_port, sink_conn);
    start_acceptors(o->source_port, source_conn);
    printf("{\"mode\":\"target\",\"ready\":true}\n");
    fflush(stdout);
    echo_loop(o->echo_port, o->echo1_port);
    return 0;
}

/* ------------------------------------------------------------------ */
/* bulk throughput                                                     */
/* ------------------------------------------------------------------ */

struct stream {
    const struct opts *o;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    uint64_t want;
    uint64_t done;
    double end;
    int ok;
    int capped;
    pthread_barrier_t *barrier;
    double *deadline;
};

static int bulk_connect(struct stream *s)
{
    int fd = socket(s->addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    set_io_timeouts(fd, IO_TIMEOUT_S);
    const char *why = NULL;
    if (connect(fd, (struct sockaddr *)&s->addr, s->addrlen))
        why = strerror(errno);
    else if (!s->o->direct)
        why = socks_handshake_blocking(fd, s->o);
    if (why) {
        fprintf(stderr, "loadgen: bulk stream setup failed: %s\n", why);
        close(fd);
        return -1;
    }
    return fd;
}

static void bulk_upload(struct stream *s, int fd, uint8_t *buf)
{
    uint8_t hdr[8];
    put_be64(hdr, s->want);
    if (write_full(fd, hdr, 8))
        return;
    while (s->done < s->want) {
        if (now_s() > *s->deadline) {
            s->capped = 1;
            s->end = now_s();
            s->ok = 1;
            return;
        }
        uint64_t left = s->want - s->done;
        ssize_t w = send(fd, buf, left < CHUNK ? left : CHUNK, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        s->done += (uint64_t)w;
    }
    char k;
    if (read_full(fd, &k, 1) == 0 && k == 'K') {
        s->end = now_s();
        s->ok = 1;
    }
}

static void bulk_download(struct stream *s, int fd, uint8_t *buf)
{
    uint8_t hdr[8];
    put_be64(hdr, s->want);
    if (write_full(fd, hdr, 8))
        return;
    while (s->done < s->want) {
        if (now_s() > *s->deadline) {
            s->capped = 1;
            break;
        }
        uint64_t left = s->want - s->done;
        ssize_t r = read(fd, buf, left < CHUNK ? left : CHUNK);
        if (r <= 0)
            return;
        s->done += (uint64_t)r;
    }
    s->end = now_s();
    s->ok = 1;
}

static void *bulk_thread(void *arg)
{
    struct stream *s = arg;
    uint8_t *buf = malloc(CHUNK);
    memset(buf, 0x5a, CHUNK);
    int fd = bulk_connect(s);
    pthread_barrier_wait(s->barrier); /* all streams start moving data together */
    pthread_barrier_wait(s->barrier); /* main has set the deadline */
    if (fd >= 0) {
        if (!strcmp(s->o->dir, "up"))
            bulk_upload(s, fd, buf);
        else
            bulk_download(s, fd, buf);
        close(fd);
    }
    free(buf);
    return NULL;
}

static int cmd_bulk(const struct opts *o)
{
    int n = o->streams;
    struct stream *ss = calloc((size_t)n, sizeof *ss);
    pthread_t *th = calloc((size_t)n, sizeof *th);
    pthread_barrier_t barrier;
    double deadline = 0;
    pthread_barrier_init(&barrier, NULL, (unsigned)n + 1);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < n; i++) {
        ss[i].o = o;
        first_hop(o, &ss[i].addr, &ss[i].addrlen);
        ss[i].want = o->bytes / (uint64_t)n;
        ss[i].barrier = &barrier;
        ss[i].deadline = &deadline;
        if (pthread_create(&th[i], NULL, bulk_thread, &ss[i]))
            die("pthread_create");
    }
    pthread_barrier_wait(&barrier);
    double cpu0 = cpu_s(), t0 = now_s();
    deadline = t0 + o->cap;
    pthread_barrier_wait(&barrier);
    uint64_t total = 0;
    double end = t0;
    int ok = 0, capped = 0;
    for (int i = 0; i < n; i++) {
        pthread_join(th[i], NULL);
        total += ss[i].done;
        ok += ss[i].ok;
        capped |= ss[i].capped;
        if (ss[i].end > end)
            end = ss[i].end;
    }
    double secs = end - t0;
    printf("{\"mode\":\"bulk\",\"dir\":\"%s\",\"streams\":%d,\"ok_streams\":%d,"
           "\"bytes\":%llu,\"seconds\":%.6f,\"mb_per_s\":%.3f,\"capped\":%s,"
           "\"client_cpu_s\":%.4f}\n",
           o->dir, n, ok, (unsigned long long)total, secs,
           secs > 0 ? (double)total / secs / 1e6 : 0.0, capped ? "true" : "false",
           cpu_s() - cpu0);
    return ok == n ? 0 : 1;
}

/* ------------------------------------------------------------------ */
/* connection rate / idle connections (epoll state machine)            */
/* ------------------------------------------------------------------ */

enum cstate { C_CONNECTING, C_GREETING, C_AUTH, C_REPLY, C_ECHO, C_EOF, C_IDLE };

static const char *const state_names[] = {"connecting", "greeting", "auth", "reply",
                                          "echo", "eof", "idle"};

struct conn {
    int fd;
    enum cstate st;
    double t0;
    uint8_t in[300];
    size_t have, need;
    uint8_t out[600];
    size_t out_len, out_off;
    uint8_t payload[ECHO_LEN];
    const char *why; /* protocol error description, for diagnostics */
};

struct runner {
    const struct opts *o;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int ep;
    int hold;           /* idle mode: keep connections after the echo */
    long launched, completed, errors, aborted, dropped;
    long active;
    uint32_t *lat_us;   /* one per completed connection */
    long serial;
    int err_printed;
};

static void queue_out(struct conn *c, const uint8_t *p, size_t n)
{
    memcpy(c->out, p, n);
    c->out_len = n;
    c->out_off = 0;
}

static void expect_in(struct conn *c, size_t n)
{
    c->have = 0;
    c->need = n;
}

static void start_echo(struct runner *r, struct conn *c)
{
    long s = r->serial++;
    for (int i = 0; i < ECHO_LEN; i++)
        c->payload[i] = (uint8_t)(s * 7 + i);
    queue_out(c, c->payload, ECHO_LEN);
    expect_in(c, ECHO_LEN);
    c->st = C_ECHO;
}

static void start_connect_req(struct runner *r, struct conn *c)
{
    c->out_len = build_connect(c->out, r->o->dst, r->o->dport);
    c->out_off = 0;
    expect_in(c, 5);
    c->st = C_REPLY;
}

/* Called once the TCP connection to the first hop is up. */
static void on_connected(struct runner *r, struct conn *c)
{
    if (r->o->direct) {
        start_echo(r, c);
        return;
    }
    c->out_len = build_greeting(c->out, r->o);
    c->out_off = 0;
    expect_in(c, 2);
    c->st = C_GREETING;
}

/*
 * A complete message of c->need bytes is in c->in: validate it and move on.
 * Returns 0 to keep driving, 1 when the connection finished its job, -1 on
 * protocol error.
 */
static int advance(struct runner *r, struct conn *c)
{
    switch (c->st) {
    case C_GREETING:
        if (c->in[0] != 5 || c->in[1] != (r->o->user ? 2 : 0)) {
            c->why = "method not accepted";
            return -1;
        }
        if (r->o->user) {
            c->out_len = build_auth(c->out, r->o);
            c->out_off = 0;
            expect_in(c, 2);
            c->st = C_AUTH;
        } else {
            start_connect_req(r, c);
        }
        return 0;
    case C_AUTH:
        if (c->in[0] != 1 || c->in[1] != 0) {
            c->why = "authentication rejected";
            return -1;
        }
        start_connect_req(r, c);
        return 0;
    case C_REPLY:
        if (c->need == 5) {
            int total = connect_reply_len(c->in);
            if (total < 0) {
                c->why = reply_error(c->in);
                return -1;
            }
            c->need = (size_t)total;
            return 0;
        }
        start_echo(r, c);
        return 0;
    case C_ECHO:
        if (memcmp(c->in, c->payload, ECHO_LEN)) {
            c->why = "echo mismatch";
            return -1;
        }
        if (r->hold || !r->o->server_closes)
            return 1;
        /* The echo1 target closes after echoing; wait for that EOF so the
         * server side, not ours nor the proxy's outbound side, ends up in
         * TIME_WAIT (see README: Dante binds its outbound port explicitly
         * and would otherwise run out of ephemeral ports). */
        c->st = C_EOF;
        expect_in(c, 0);
        return 0;
    default:
        return -1;
    }
}

/* Push pending output and pull expected input until EAGAIN (edge-triggered). */
static int drive(struct runner *r, struct conn *c, uint32_t events)
{
    if (c->st == C_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof err;
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return 0;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            errno = err;
            return -1;
        }
        on_connected(r, c);
    }
    if (c->st == C_IDLE) {
        /* Only a readable idle connection matters: EOF or error means the
         * proxy dropped it; EAGAIN was a stale edge. */
        uint8_t b[64];
        ssize_t n = read(c->fd, b, sizeof b);
        if (n < 0 && errno == EAGAIN)
            return 0;
        c->why = n > 0 ? "unexpected data on idle connection" : "idle connection dropped";
        return -1;
    }
    for (;;) {
        if (c->out_off < c->out_len) {
            ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
            if (w < 0)
                return errno == EAGAIN ? 0 : -1;
            c->out_off += (size_t)w;
            continue;
        }
        if (c->have < c->need) {
            ssize_t n = read(c->fd, c->in + c->have, c->need - c->have);
            if (n == 0) {
                errno = ECONNRESET;
                return -1;
            }
            if (n < 0)
                return errno == EAGAIN ? 0 : -1;
            c->have += (size_t)n;
            continue;
        }
        if (c->st == C_EOF) {
            uint8_t extra[64];
            ssize_t n = read(c->fd, extra, sizeof extra);
            if (n == 0)
                return 1;
            if (n > 0) {
                c->why = "unexpected data after echo";
                return -1;
            }
            return errno == EAGAIN ? 0 : -1;
        }
        int a = advance(r, c);
        if (a != 0)
            return a;
    }
}

static void launch(struct runner *r)
{
    struct conn *c = calloc(1, sizeof *c);
    r->launched++;
    c->t0 = now_s();
    c->fd = socket(r->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        r->errors++;
        free(c);
        return;
    }
    set_nodelay(c->fd);
    c->st = C_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLET, .data.ptr = c};
    epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd, &ev);
    r->active++;
    if (connect(c->fd, (struct sockaddr *)&r->addr, r->addrlen) == 0) {
        on_connected(r, c);
        /* the edge-triggered EPOLLOUT that follows drives the first send */
    } else if (errno != EINPROGRESS) {
        if (r->err_printed++ < 5)
            fprintf(stderr, "loadgen: connect: %s\n", strerror(errno));
        close(c->fd);
        free(c);
        r->active--;
        r->errors++;
    }
}

static void finish(struct runner *r, struct conn *c, int result)
{
    if (result == 1 && r->hold) {
        c->st = C_IDLE;
        r->completed++;
        /* stay registered, level-triggered on input only: see drive() */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = c};
        epoll_ctl(r->ep, EPOLL_CTL_MOD, c->fd, &ev);
        return;
    }
    if (result == 1) {
        r->lat_us[r->completed++] = (uint32_t)((now_s() - c->t0) * 1e6);
    } else if (c->st == C_IDLE) {
        r->dropped++;
        r->completed--;
    } else {
        if (r->err_printed++ < 5)
            fprintf(stderr, "loadgen: connection failed in state %s: %s\n",
                    state_names[c->st], c->why ? c->why : strerror(errno));
        r->errors++;
    }
    close(c->fd);
    free(c);
    r->active--;
}

/* One epoll_wait round; returns the number of events handled. */
static int poll_once(struct runner *r, int timeout_ms)
{
    struct epoll_event evs[256];
    int n = epoll_wait(r->ep, evs, 256, timeout_ms);
    for (int i = 0; i < n; i++) {
        struct conn *c = evs[i].data.ptr;
        int res = drive(r, c, evs[i].events);
        if (res != 0)
            finish(r, c, res);
    }
    return n < 0 ? 0 : n;
}

static void runner_init(struct runner *r, const struct opts *o, int hold)
{
    memset(r, 0, sizeof *r);
    r->o = o;
    r->hold = hold;
    r->ep = epoll_create1(EPOLL_CLOEXEC);
    r->lat_us = calloc((size_t)o->count + 1, sizeof *r->lat_us);
    first_hop(o, &r->addr, &r->addrlen);
}

/*
 * Keep `concurrency` connections in flight until `count` were launched or
 * the cap passed, then let in-flight ones finish (bounded by a grace
 * period).  In hold mode "in flight" excludes the idle established ones.
 */
static double run_connections(struct runner *r)
{
    const struct opts *o = r->o;
    double t0 = now_s(), deadline = t0 + o->cap;
    for (;;) {
        double t = now_s();
        long busy = r->active - (r->hold ? r->completed : 0);
        while (busy < o->concurrency && r->launched < o->count && t < deadline) {
            launch(r);
            busy = r->active - (r->hold ? r->completed : 0);
        }
        if (busy == 0 && (r->launched >= o->count || t >= deadline))
            break;
        if (t > deadline + GRACE_S) {
            r->aborted = busy;
            break;
        }
        poll_once(r, 50);
    }
    return now_s() - t0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static uint32_t percentile(const uint32_t *sorted, long n, double p)
{
    if (n <= 0)
        return 0;
    long idx = (long)(p * (double)(n - 1) + 0.5);
    return sorted[idx];
}

static int cmd_conn(const struct opts *o)
{
    struct runner r;
    signal(SIGPIPE, SIG_IGN);
    runner_init(&r, o, 0);
    double cpu0 = cpu_s();
    double secs = run_connections(&r);
    qsort(r.lat_us, (size_t)r.completed, sizeof *r.lat_us, cmp_u32);
    double sum = 0;
    for (long i = 0; i < r.completed; i++)
        sum += r.lat_us[i];
    printf("{\"mode\":\"conn\",\"completed\":%ld,\"errors\":%ld,\"aborted\":%ld,"
           "\"seconds\":%.6f,\"conn_per_s\":%.2f,\"p50_us\":%u,\"p99_us\":%u,"
           "\"mean_us\":%.1f,\"client_cpu_s\":%.4f}\n",
           r.completed, r.errors, r.aborted, secs, secs > 0 ? (double)r.completed / secs : 0.0,
           percentile(r.lat_us, r.completed, 0.50), percentile(r.lat_us, r.completed, 0.99),
           r.completed ? sum / (double)r.completed : 0.0, cpu_s() - cpu0);
    return r.errors || r.aborted ? 1 : 0;
}

/* Hold idle connections until stdin reaches EOF (or a line) or the hold cap. */
static void hold_until_released(struct runner *r, double hold)
{
    double end = now_s() + hold;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(r->ep, EPOLL_CTL_ADD, 0, &ev);
    while (now_s() < end) {
        struct epoll_event evs[64];
        int n = epoll_wait(r->ep, evs, 64, 100);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL)
                return; /* stdin readable: released (or EOF) */
            int res = drive(r, c, evs[i].events);
            if (res != 0)
                finish(r, c, res);
        }
    }
}

static int cmd_idle(const struct opts *o)
{
    struct runner r;
    signal(SIGPIPE, SIG_IGN);
    runner_init(&r, o, 1);
    double secs = run_connections(&r);
    printf("{\"mode\":\"idle\",\"phase\":\"ready\",\"established\":%ld,\"errors\":%ld,"
           "\"dropped\":%ld,\"seconds\":%.3f}\n",
           r.completed, r.errors, r.dropped, secs);
    fflush(stdout);
    hold_until_released(&r, o->hold);
    printf("{\"mode\":\"idle\",\"phase\":\"done\",\"established\":%ld,\"dropped\":%ld}\n",
           r.completed, r.dropped);
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o;
    parse_opts(argc, argv, &o);
    raise_nofile();
    if (!strcmp(o.mode, "target")) {
        if (!o.echo_port || !o.echo1_port || !o.sink_port || !o.source_port)
            errno = EINVAL, die("target needs --echo --echo1 --sink --source");
        return cmd_target(&o);
    }
    if (!o.dst || !o.dport || (!o.direct && !o.proxy_port))
        errno = EINVAL, die("need --proxy, --dst and --dport");
    if (o.user && (!o.pass || strlen(o.user) > 255 || strlen(o.pass) > 255))
        errno = EINVAL, die("bad --user/--pass");
    if (!strcmp(o.mode, "bulk")) {
        alarm((unsigned)(o.cap + 2 * IO_TIMEOUT_S + 10));
        return cmd_bulk(&o);
    }
    if (!strcmp(o.mode, "conn")) {
        alarm((unsigned)(o.cap + GRACE_S + 10));
        return cmd_conn(&o);
    }
    if (!strcmp(o.mode, "idle")) {
        alarm((unsigned)(o.cap + GRACE_S + o.hold + 10));
        return cmd_idle(&o);
    }
    fprintf(stderr, "usage: loadgen target|bulk|conn|idle [options]\n");
    return 2;
}
