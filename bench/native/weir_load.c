/*
 * weir_load: the load generator of the proxy benchmark, against an echo
 * server (weir_echo), so that the harness is never what limits a figure.
 *
 *   weir_load MODE --host IP --port PORT [options]     (one JSON line on stdout)
 *
 * Modes:
 *   bulk  one connection; writes --mib MiB while reading the echo back, then
 *         half-closes and reads to EOF. Reports gbps: payload bits one way
 *         per second, from connected to the echo's EOF.
 *   rr    --conns connections, each a closed loop of --size-byte requests
 *         (write, read the whole echo, repeat) for --seconds. Reports
 *         requests/s and latency percentiles (write to last byte read).
 *   rate  open loop: --rate requests/s in total, request k of a thread is
 *         due at start + k/rate and goes to its connections in turn
 *         (pipelined if the previous answer is late). Latency runs from the
 *         time a request was due, not when it could be written, so a stall
 *         counts for every request it delayed (no coordinated omission).
 *         per_s counts answers within the window (a path that cannot keep
 *         up falls short); answers up to 2 s later still count in the
 *         latencies and in "answered", and requests unanswered by then are
 *         errors.
 *   crr   --conns slots, each in a loop: connect, write --size bytes, read
 *         the echo, close. Reports connections/s and percentiles of
 *         connect + request + echo.
 *
 * Options: --seconds T (5), --size S (1024), --conns C (32), --rate R,
 * --mib N (256), --threads N (1: connections are split over threads, each
 * with its own epoll loop), --connect-timeout S (2), --deadline S (a hard
 * bound on the run, default seconds + 10 or 60 for bulk), --max-failures N
 * (1000: stop early past that many).
 *
 * Latencies go to a log-linear histogram (128 linear steps per power of
 * two, under 0.8 % error, fixed size), so memory does not grow with the
 * run. Exit status: 0 if nothing failed, 2 if anything did (the report is
 * printed either way), 1 for bad options.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define SUB_BITS 7
#define SUB (1u << SUB_BITS)
#define MAX_EXP 40 /* 2^40 ns, about 18 minutes: longer latencies are clamped */
#define NBUCKETS (SUB + (MAX_EXP - SUB_BITS + 1) * SUB)
#define RATE_QUEUE 4096 /* requests a connection may have outstanding in rate mode */
#define SCRATCH (1u << 20)
#define RETRY_NS 10000000ull /* a failed crr slot waits 10 ms before trying again */
#define DRAIN_NS 2000000000ull

enum mode { BULK, RR, RATE, CRR };
static const char *const MODE_NAMES[] = { "bulk", "rr", "rate", "crr" };

struct options {
	enum mode mode;
	struct sockaddr_storage addr;
	socklen_t addrlen;
	double seconds;
	size_t size;
	int conns;
	double rate;
	long mib;
	int threads;
	double connect_timeout;
	double deadline;
	long max_failures;
};

struct hist {
	uint64_t counts[NBUCKETS];
	uint64_t total;
	uint64_t max;
};

enum state { IDLE, CONNECTING, OPEN, WAITING_RETRY, DEAD };

struct conn {
	int fd;
	enum state state;
	uint64_t since;      /* crr: connect start; CONNECTING: for the timeout */
	uint64_t retry_at;   /* WAITING_RETRY: when the slot tries again */
	size_t to_send;      /* bytes still to write (several requests when pipelined) */
	size_t got;          /* bytes of the current answer read so far */
	int out_armed;       /* EPOLLOUT is in the interest set */
	uint64_t *due;       /* ring of send (rr, crr) or due (rate) times */
	unsigned head, count, cap;
};

struct worker {
	pthread_t tid;
	const struct options *o;
	int ep;
	struct conn *conns;
	int nconns;
	char *scratch;
	struct hist hist;
	uint64_t ops, sent, connected;
	uint64_t answered; /* rate: ops counts answers in the window, this also the late ones */
	uint64_t connect_failures, io_failures, timeouts, incomplete, overflows;
	uint64_t bytes_sent, bytes_received;
	uint64_t started, ended;
};

static const char *sendbuf;
static size_t sendbuf_len;
static pthread_barrier_t ready_barrier;
static volatile sig_atomic_t interrupted;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* -- histogram ---------------------------------------------------------- */

static unsigned bucket_of(uint64_t v)
{
	if (v < SUB)
		return (unsigned)v;
	unsigned e = 63u - (unsigned)__builtin_clzll(v);
	if (e > MAX_EXP)
		return NBUCKETS - 1;
	unsigned shift = e - SUB_BITS;
	return SUB + (e - SUB_BITS) * SUB + (unsigned)((v >> shift) - SUB);
}

/* The middle of a bucket's range: what a percentile that lands in it reports. */
static double bucket_value(unsigned b)
{
	if (b < SUB)
		return b;
	unsigned shift = (b - SUB) / SUB;
	uint64_t mant = SUB + (b - SUB) % SUB;
	uint64_t lo = mant << shift;
	uint64_t width = 1ull << shift;
	return (double)lo + (double)(width - 1) / 2.0;
}

static void record(struct hist *h, uint64_t ns)
{
	h->counts[bucket_of(ns)]++;
	h->total++;
	if (ns > h->max)
		h->max = ns;
}

static void merge(struct hist *into, const struct hist *from)
{
	for (unsigned i = 0; i < NBUCKETS; i++)
		into->counts[i] += from->counts[i];
	into->total += from->total;
	if (from->max > into->max)
		into->max = from->max;
}

/* In microseconds; the maximum is exact, never a bucket's middle. */
static double percentile_us(const struct hist *h, double p)
{
	if (h->total == 0)
		return 0.0;
	uint64_t rank = (uint64_t)(p / 100.0 * (double)h->total + 0.999999);
	if (rank < 1)
		rank = 1;
	uint64_t seen = 0;
	for (unsigned i = 0; i < NBUCKETS; i++) {
		seen += h->counts[i];
		if (seen >= rank) {
			double v = bucket_value(i);
			return (v > (double)h->max ? (double)h->max : v) / 1000.0;
		}
	}
	return (double)h->max / 1000.0;
}

/* -- options -------------------------------------------------------------- */

static void usage(const char *why)
{
	fprintf(stderr,
		"weir_load: %s\n"
		"usage: weir_load bulk|rr|rate|crr --host IP --port PORT [--seconds T] [--size S]\n"
		"       [--conns C] [--rate R] [--mib N] [--threads N] [--connect-timeout S]\n"
		"       [--deadline S] [--max-failures N]\n",
		why);
	exit(1);
}

static double parse_double(const char *flag, const char *value, double lo, double hi)
{
	char *end;
	errno = 0;
	double v = strtod(value, &end);
	if (errno || *end || end == value || !(v >= lo && v <= hi)) {
		fprintf(stderr, "weir_load: %s must be a number in %g..%g, not %s\n", flag, lo, hi,
			value);
		exit(1);
	}
	return v;
}

static long parse_long(const char *flag, const char *value, long lo, long hi)
{
	double v = parse_double(flag, value, (double)lo, (double)hi);
	if (v != (double)(long)v) {
		fprintf(stderr, "weir_load: %s must be an integer, not %s\n", flag, value);
		exit(1);
	}
	return (long)v;
}

static struct options parse(int argc, char **argv)
{
	struct options o;
	memset(&o, 0, sizeof o);
	o.seconds = 5;
	o.size = 1024;
	o.conns = 32;
	o.mib = 256;
	o.threads = 1;
	o.connect_timeout = 2;
	o.max_failures = 1000;
	if (argc < 2)
		usage("a mode is required");
	int mode = -1;
	for (int m = 0; m < 4; m++)
		if (!strcmp(argv[1], MODE_NAMES[m]))
			mode = m;
	if (mode < 0)
		usage("the mode is one of bulk, rr, rate, crr");
	o.mode = (enum mode)mode;
	const char *host = NULL;
	int port = -1;
	for (int i = 2; i < argc; i++) {
		const char *flag = argv[i];
		if (i + 1 >= argc)
			usage("every option takes a value");
		const char *value = argv[++i];
		if (!strcmp(flag, "--host"))
			host = value;
		else if (!strcmp(flag, "--port"))
			port = (int)parse_long(flag, value, 1, 65535);
		else if (!strcmp(flag, "--seconds"))
			o.seconds = parse_double(flag, value, 0.01, 3600);
		else if (!strcmp(flag, "--size"))
			o.size = (size_t)parse_long(flag, value, 1, 1 << 20);
		else if (!strcmp(flag, "--conns"))
			o.conns = (int)parse_long(flag, value, 1, 10000);
		else if (!strcmp(flag, "--rate"))
			o.rate = parse_double(flag, value, 1, 1e7);
		else if (!strcmp(flag, "--mib"))
			o.mib = parse_long(flag, value, 1, 1 << 20);
		else if (!strcmp(flag, "--threads"))
			o.threads = (int)parse_long(flag, value, 1, 64);
		else if (!strcmp(flag, "--connect-timeout"))
			o.connect_timeout = parse_double(flag, value, 0.01, 60);
		else if (!strcmp(flag, "--deadline"))
			o.deadline = parse_double(flag, value, 0.1, 7200);
		else if (!strcmp(flag, "--max-failures"))
			o.max_failures = parse_long(flag, value, 1, 1L << 40);
		else
			usage("unknown option");
	}
	if (!host || port < 0)
		usage("--host and --port are required");
	struct sockaddr_in *sin = (struct sockaddr_in *)&o.addr;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&o.addr;
	if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)port);
		o.addrlen = sizeof *sin;
	} else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons((uint16_t)port);
		o.addrlen = sizeof *sin6;
	} else {
		usage("--host must be an IPv4 or IPv6 address");
	}
	if (o.mode == RATE && o.rate <= 0)
		usage("rate mode needs --rate");
	if (o.mode != RATE && o.rate > 0)
		usage("--rate is for rate mode only");
	if (o.mode == BULK)
		o.threads = 1, o.conns = 1;
	if (o.threads > o.conns)
		usage("--threads must not exceed --conns");
	if (o.deadline == 0)
		o.deadline = o.mode == BULK ? 60 : o.seconds + o.connect_timeout + 10;
	if (o.mode != BULK && o.deadline < o.seconds)
		usage("--deadline must not be shorter than --seconds");
	return o;
}

/* -- connections ---------------------------------------------------------- */

static void watch(struct worker *w, struct conn *c, int op, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };
	if (epoll_ctl(w->ep, op, c->fd, &ev) < 0) {
		perror("epoll_ctl");
		exit(3);
	}
}

static void close_conn(struct conn *c, enum state next)
{
	if (c->fd >= 0)
		close(c->fd);
	c->fd = -1;
	c->state = next;
	c->to_send = c->got = 0;
	c->head = c->count = 0;
	c->out_armed = 0;
}

/* A non-blocking connect; CONNECTING until writable, or a failure counted now. */
static int start_connect(struct worker *w, struct conn *c, uint64_t now)
{
	const struct options *o = w->o;
	c->fd = socket(o->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd < 0) {
		w->connect_failures++;
		c->state = WAITING_RETRY;
		c->retry_at = now + RETRY_NS;
		return -1;
	}
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	c->since = now;
	c->state = CONNECTING;
	if (connect(c->fd, (const struct sockaddr *)&o->addr, o->addrlen) < 0 &&
	    errno != EINPROGRESS) {
		w->connect_failures++;
		close_conn(c, WAITING_RETRY);
		c->retry_at = now + RETRY_NS;
		return -1;
	}
	watch(w, c, EPOLL_CTL_ADD, EPOLLOUT);
	return 0;
}

static int connect_finished(struct worker *w, struct conn *c, uint64_t now)
{
	int err = 0;
	socklen_t len = sizeof err;
	if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err) {
		w->connect_failures++;
		close_conn(c, WAITING_RETRY);
		c->retry_at = now + RETRY_NS;
		return -1;
	}
	c->state = OPEN;
	w->connected++;
	watch(w, c, EPOLL_CTL_MOD, EPOLLIN);
	c->out_armed = 0;
	return 0;
}

static void queue_request(struct worker *w, struct conn *c, uint64_t when)
{
	if (c->count == c->cap) {
		w->overflows++;
		return;
	}
	c->due[(c->head + c->count) % c->cap] = when;
	c->count++;
	c->to_send += w->o->size;
	w->sent++;
}

/* Writes what is pending. 0: done or the socket is full (EPOLLOUT asked), -1: failed. */
static int pump_out(struct worker *w, struct conn *c)
{
	while (c->to_send > 0) {
		size_t len = c->to_send < sendbuf_len ? c->to_send : sendbuf_len;
		ssize_t n = write(c->fd, sendbuf, len);
		if (n > 0) {
			c->to_send -= (size_t)n;
			w->bytes_sent += (uint64_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (!c->out_armed)
				watch(w, c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
			c->out_armed = 1;
			return 0;
		} else {
			return -1;
		}
	}
	/* Changed only when it must: an epoll_ctl per request would cost as much as the write. */
	if (c->out_armed)
		watch(w, c, EPOLL_CTL_MOD, EPOLLIN);
	c->out_armed = 0;
	return 0;
}

/*
 * Reads what arrived; every `size` bytes answer the oldest queued request.
 * Returns the number of answers completed, or -1 on EOF, error, or more
 * bytes than were asked for.
 */
static int pump_in(struct worker *w, struct conn *c, uint64_t now, int record_latency)
{
	int answered = 0;
	for (;;) {
		ssize_t n = read(c->fd, w->scratch, SCRATCH);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return answered;
		if (n <= 0)
			return -1;
		w->bytes_received += (uint64_t)n;
		size_t total = c->got + (size_t)n;
		size_t size = w->o->size;
		while (total >= size) {
			if (c->count == 0)
				return -1;
			if (record_latency)
				record(&w->hist, now - c->due[c->head]);
			c->head = (c->head + 1) % c->cap;
			c->count--;
			total -= size;
			answered++;
		}
		c->got = total;
		if (total > 0 && c->count == 0)
			return -1;
	}
}

/* -- the modes -------------------------------------------------------------- */

static int failed_too_often(const struct worker *w)
{
	uint64_t failures = w->connect_failures + w->io_failures + w->timeouts + w->overflows;
	return failures >= (uint64_t)w->o->max_failures;
}

static int wait_ms(uint64_t now, uint64_t until, int cap_ms)
{
	if (until <= now)
		return 0;
	uint64_t ms = (until - now + 999999) / 1000000;
	return ms > (uint64_t)cap_ms ? cap_ms : (int)ms;
}

/* rr and rate: all connections are made first, then every thread starts together. */
static void connect_all(struct worker *w, uint64_t hard_end)
{
	uint64_t now = now_ns();
	uint64_t give_up = now + (uint64_t)(w->o->connect_timeout * 1e9);
	int pending = 0;
	for (int i = 0; i < w->nconns; i++)
		pending += start_connect(w, &w->conns[i], now) == 0;
	struct epoll_event events[MAX_EVENTS];
	while (pending > 0) {
		now = now_ns();
		if (now >= hard_end || now >= give_up || interrupted)
			break;
		int n = epoll_wait(w->ep, events, MAX_EVENTS, wait_ms(now, give_up, 100));
		for (int i = 0; i < n; i++) {
			struct conn *c = events[i].data.ptr;
			if (c->state == CONNECTING) {
				connect_finished(w, c, now);
				pending--;
			}
		}
	}
	for (int i = 0; i < w->nconns; i++) {
		struct conn *c = &w->conns[i];
		if (c->state == CONNECTING) {
			w->timeouts++;
			close_conn(c, DEAD);
		} else if (c->state != OPEN) {
			close_conn(c, DEAD);
		}
	}
}

/* rr and rate: a broken connection is not replaced; what it had queued is lost. */
static void fail_conn(struct worker *w, struct conn *c, int *alive)
{
	w->io_failures++;
	w->incomplete += c->count;
	close_conn(c, DEAD);
	(*alive)--;
}

/* One epoll event on an open request/response connection: writes what is
 * queued, reads answers. Returns how many requests it answered, or -1 when
 * there is nothing more to do with it now (not open, no input, or failed). */
static int conn_event(struct worker *w, struct conn *c, uint32_t events, uint64_t now,
		      int record_latency, int *alive)
{
	if (c->state != OPEN)
		return -1;
	if ((events & EPOLLOUT) && pump_out(w, c) < 0) {
		fail_conn(w, c, alive);
		return -1;
	}
	if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
		return -1;
	int answered = pump_in(w, c, now, record_latency);
	if (answered < 0) {
		fail_conn(w, c, alive);
		return -1;
	}
	return answered;
}

static void run_rr(struct worker *w, uint64_t hard_end)
{
	int alive = 0;
	uint64_t now = now_ns();
	w->started = now;
	uint64_t end = now + (uint64_t)(w->o->seconds * 1e9);
	if (end > hard_end)
		end = hard_end;
	for (int i = 0; i < w->nconns; i++) {
		struct conn *c = &w->conns[i];
		if (c->state != OPEN)
			continue;
		alive++;
		queue_request(w, c, now);
		if (pump_out(w, c) < 0)
			fail_conn(w, c, &alive);
	}
	struct epoll_event events[MAX_EVENTS];
	while (alive > 0 && !interrupted && !failed_too_often(w)) {
		now = now_ns();
		if (now >= end)
			break;
		int n = epoll_wait(w->ep, events, MAX_EVENTS, wait_ms(now, end, 100));
		now = now_ns();
		for (int i = 0; i < n; i++) {
			struct conn *c = events[i].data.ptr;
			int answered = conn_event(w, c, events[i].events, now, now < end, &alive);
			if (answered < 0)
				continue;
			if (now < end)
				w->ops += (uint64_t)answered;
			if (answered > 0 && now < end) {
				queue_request(w, c, now);
				if (pump_out(w, c) < 0)
					fail_conn(w, c, &alive);
			}
		}
	}
	w->ended = now < end ? now : end;
	/* Requests in flight at the end are neither answered nor failed: the window closed. */
}

static void arm(int tfd, uint64_t at)
{
	struct itimerspec its;
	memset(&its, 0, sizeof its);
	its.it_value.tv_sec = (time_t)(at / 1000000000ull);
	its.it_value.tv_nsec = (long)(at % 1000000000ull);
	if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0) {
		perror("timerfd_settime");
		exit(3);
	}
}

static void run_rate(struct worker *w, uint64_t hard_end)
{
	const struct options *o = w->o;
	double per_thread = o->rate / o->threads;
	double interval = 1e9 / per_thread;
	int alive = 0;
	for (int i = 0; i < w->nconns; i++)
		alive += w->conns[i].state == OPEN;
	int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	if (tfd < 0) {
		perror("timerfd_create");
		exit(3);
	}
	static char timer_tag;
	struct epoll_event tev = { .events = EPOLLIN, .data.ptr = &timer_tag };
	if (epoll_ctl(w->ep, EPOLL_CTL_ADD, tfd, &tev) < 0) {
		perror("epoll_ctl timer");
		exit(3);
	}
	uint64_t start = now_ns();
	w->started = start;
	uint64_t end = start + (uint64_t)(o->seconds * 1e9);
	if (end > hard_end)
		end = hard_end;
	uint64_t drain_end = end + DRAIN_NS < hard_end ? end + DRAIN_NS : hard_end;
	uint64_t k = 0;
	int next_conn = 0;
	uint64_t next_due = start;
	arm(tfd, next_due);
	struct epoll_event events[MAX_EVENTS];
	uint64_t now = start;
	while (alive > 0 && !interrupted && !failed_too_often(w)) {
		now = now_ns();
		if (now >= drain_end)
			break;
		if (now >= end) {
			uint64_t outstanding = 0;
			for (int i = 0; i < w->nconns; i++)
				outstanding += w->conns[i].count;
			if (outstanding == 0)
				break;
		}
		int n = epoll_wait(w->ep, events, MAX_EVENTS, wait_ms(now, drain_end, 100));
		now = now_ns();
		for (int i = 0; i < n; i++) {
			if (events[i].data.ptr == &timer_tag) {
				uint64_t expirations;
				if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN) {
					perror("read timerfd");
					exit(3);
				}
				while (next_due <= now && next_due < end && alive > 0) {
					struct conn *c = &w->conns[next_conn];
					next_conn = (next_conn + 1) % w->nconns;
					if (c->state != OPEN)
						continue;
					queue_request(w, c, next_due);
					if (pump_out(w, c) < 0)
						fail_conn(w, c, &alive);
					k++;
					next_due = start + (uint64_t)((double)k * interval);
				}
				if (next_due < end)
					arm(tfd, next_due);
				continue;
			}
			struct conn *c = events[i].data.ptr;
			int answered = conn_event(w, c, events[i].events, now, 1, &alive);
			if (answered < 0)
				continue;
			w->answered += (uint64_t)answered;
			if (now < end)
				w->ops += (uint64_t)answered;
		}
	}
	w->ended = end;
	for (int i = 0; i < w->nconns; i++)
		w->incomplete += w->conns[i].count;
	close(tfd);
}

static void run_crr(struct worker *w, uint64_t hard_end)
{
	const struct options *o = w->o;
	/* A connect gets --connect-timeout; the whole exchange twice that. */
	uint64_t timeout = (uint64_t)(o->connect_timeout * 1e9);
	uint64_t now = now_ns();
	w->started = now;
	uint64_t end = now + (uint64_t)(o->seconds * 1e9);
	if (end > hard_end)
		end = hard_end;
	for (int i = 0; i < w->nconns; i++) {
		w->conns[i].state = IDLE;
		w->conns[i].retry_at = now;
	}
	struct epoll_event events[MAX_EVENTS];
	uint64_t last_scan = 0;
	while (!interrupted && !failed_too_often(w)) {
		now = now_ns();
		if (now >= end)
			break;
		if (now - last_scan >= 1000000) {
			/* Timeouts and retries, at most once a millisecond: O(conns) each. */
			last_scan = now;
			for (int i = 0; i < w->nconns; i++) {
				struct conn *c = &w->conns[i];
				uint64_t age = now - c->since;
				if ((c->state == CONNECTING && age > timeout) ||
				    (c->state == OPEN && age > 2 * timeout)) {
					w->timeouts++;
					close_conn(c, WAITING_RETRY);
					c->retry_at = now;
				}
				if ((c->state == IDLE || c->state == WAITING_RETRY) && c->retry_at <= now)
					start_connect(w, c, now);
			}
		}
		int n = epoll_wait(w->ep, events, MAX_EVENTS, wait_ms(now, end, 1));
		now = now_ns();
		for (int i = 0; i < n; i++) {
			struct conn *c = events[i].data.ptr;
			if (c->state == CONNECTING) {
				if (connect_finished(w, c, now) < 0)
					continue;
				queue_request(w, c, c->since);
				if (pump_out(w, c) < 0) {
					w->io_failures++;
					close_conn(c, WAITING_RETRY);
					c->retry_at = now + RETRY_NS;
				}
				continue;
			}
			if (c->state != OPEN)
				continue;
			if ((events[i].events & EPOLLOUT) && pump_out(w, c) < 0) {
				w->io_failures++;
				close_conn(c, WAITING_RETRY);
				c->retry_at = now + RETRY_NS;
				continue;
			}
			if (!(events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
				continue;
			int answered = pump_in(w, c, now, now < end);
			if (answered < 0) {
				w->io_failures++;
				close_conn(c, WAITING_RETRY);
				c->retry_at = now + RETRY_NS;
			} else if (answered > 0) {
				if (now < end)
					w->ops++;
				close_conn(c, IDLE);
				if (now < end)
					start_connect(w, c, now);
			}
		}
	}
	w->ended = now < end ? now : end;
	for (int i = 0; i < w->nconns; i++)
		close_conn(&w->conns[i], DEAD);
}

static void run_bulk(struct worker *w, uint64_t hard_end)
{
	struct conn *c = &w->conns[0];
	uint64_t total = (uint64_t)w->o->mib << 20;
	connect_all(w, hard_end);
	if (c->state != OPEN)
		return;
	uint64_t now = now_ns();
	w->started = now;
	uint64_t unsent = total;
	int eof = 0;
	struct epoll_event events[4];
	watch(w, c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
	while (!interrupted) {
		now = now_ns();
		if (now >= hard_end) {
			w->timeouts++;
			break;
		}
		int n = epoll_wait(w->ep, events, 4, wait_ms(now, hard_end, 100));
		if (n <= 0)
			continue;
		uint32_t e = events[0].events;
		if ((e & EPOLLOUT) && unsent > 0) {
			for (;;) {
				size_t len = unsent < sendbuf_len ? (size_t)unsent : sendbuf_len;
				ssize_t m = write(c->fd, sendbuf, len);
				if (m > 0) {
					unsent -= (uint64_t)m;
					w->bytes_sent += (uint64_t)m;
					if (unsent == 0) {
						shutdown(c->fd, SHUT_WR);
						watch(w, c, EPOLL_CTL_MOD, EPOLLIN);
						break;
					}
				} else if (m < 0 && errno == EINTR) {
					continue;
				} else if (m < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
					break;
				} else {
					w->io_failures++;
					goto out;
				}
			}
		}
		if (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
			for (;;) {
				ssize_t m = read(c->fd, w->scratch, SCRATCH);
				if (m > 0) {
					w->bytes_received += (uint64_t)m;
				} else if (m == 0) {
					eof = 1;
					break;
				} else if (errno == EINTR) {
					continue;
				} else if (errno == EAGAIN || errno == EWOULDBLOCK) {
					break;
				} else {
					w->io_failures++;
					goto out;
				}
			}
			if (eof)
				break;
		}
	}
out:
	w->ended = now_ns();
	if (eof && w->bytes_received == total && w->bytes_sent == total)
		w->ops = 1;
	else if (eof)
		w->io_failures++; /* the echo ended early, or sent more than it was given */
	close_conn(c, DEAD);
}

static void *run(void *arg)
{
	struct worker *w = arg;
	const struct options *o = w->o;
	uint64_t hard_end = now_ns() + (uint64_t)(o->deadline * 1e9);
	if (o->mode == RR || o->mode == RATE)
		connect_all(w, hard_end);
	pthread_barrier_wait(&ready_barrier);
	switch (o->mode) {
	case BULK:
		run_bulk(w, hard_end);
		break;
	case RR:
		run_rr(w, hard_end);
		break;
	case RATE:
		run_rate(w, hard_end);
		break;
	case CRR:
		run_crr(w, hard_end);
		break;
	}
	for (int i = 0; i < w->nconns; i++)
		close_conn(&w->conns[i], DEAD);
	return NULL;
}

static void on_signal(int sig)
{
	(void)sig;
	interrupted = 1;
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "weir_load: the hard deadline passed with a thread still busy\n";
	ssize_t ignored = write(2, msg, sizeof msg - 1);
	(void)ignored;
	_exit(3);
}

int main(int argc, char **argv)
{
	struct options o = parse(argc, argv);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGTERM, on_signal);
	signal(SIGINT, on_signal);
	signal(SIGALRM, on_alarm);
	/* The loops check the deadline themselves; this is the backstop if one cannot. */
	alarm((unsigned)o.deadline + 5);

	sendbuf_len = o.mode == BULK ? SCRATCH : (o.size > 65536 ? o.size : 65536);
	char *buf = malloc(sendbuf_len);
	if (!buf) {
		perror("malloc");
		return 3;
	}
	for (size_t i = 0; i < sendbuf_len; i++)
		buf[i] = (char)('a' + i % 26);
	sendbuf = buf;

	struct worker *workers = calloc((size_t)o.threads, sizeof *workers);
	if (!workers) {
		perror("calloc");
		return 3;
	}
	/* Rate mode pipelines: up to RATE_QUEUE per connection, 1 Mi entries in all. */
	unsigned queue = 1;
	if (o.mode == RATE) {
		queue = (1u << 20) / (unsigned)o.conns;
		queue = queue > RATE_QUEUE ? RATE_QUEUE : queue < 16 ? 16 : queue;
	}
	pthread_barrier_init(&ready_barrier, NULL, (unsigned)o.threads);
	for (int t = 0; t < o.threads; t++) {
		struct worker *w = &workers[t];
		w->o = &o;
		w->nconns = o.conns / o.threads + (t < o.conns % o.threads);
		w->conns = calloc((size_t)w->nconns, sizeof *w->conns);
		w->scratch = malloc(SCRATCH);
		w->ep = epoll_create1(EPOLL_CLOEXEC);
		if (!w->conns || !w->scratch || w->ep < 0) {
			perror("worker setup");
			return 3;
		}
		for (int i = 0; i < w->nconns; i++) {
			struct conn *c = &w->conns[i];
			c->fd = -1;
			c->state = IDLE;
			c->cap = queue;
			c->due = calloc(queue, sizeof *c->due);
			if (!c->due) {
				perror("calloc");
				return 3;
			}
		}
	}
	for (int t = 0; t < o.threads; t++)
		if (pthread_create(&workers[t].tid, NULL, run, &workers[t])) {
			perror("pthread_create");
			return 3;
		}

	static struct hist all;
	uint64_t ops = 0, sent = 0, answered = 0, connected = 0, connect_failures = 0, io_failures = 0;
	uint64_t timeouts = 0, incomplete = 0, overflows = 0, bytes_sent = 0, bytes_received = 0;
	uint64_t started = UINT64_MAX, ended = 0;
	for (int t = 0; t < o.threads; t++) {
		struct worker *w = &workers[t];
		pthread_join(w->tid, NULL);
		merge(&all, &w->hist);
		ops += w->ops;
		sent += w->sent;
		answered += w->answered;
		connected += w->connected;
		connect_failures += w->connect_failures;
		io_failures += w->io_failures;
		timeouts += w->timeouts;
		incomplete += w->incomplete;
		overflows += w->overflows;
		bytes_sent += w->bytes_sent;
		bytes_received += w->bytes_received;
		if (w->started && w->started < started)
			started = w->started;
		if (w->ended > ended)
			ended = w->ended;
	}
	double elapsed = started != UINT64_MAX && ended > started ? (double)(ended - started) / 1e9 : 0;
	uint64_t failures = connect_failures + io_failures + timeouts + incomplete + overflows;
	if (o.mode == BULK && ops == 0 && failures == 0)
		failures = io_failures = 1; /* interrupted before the echo was whole */

	printf("{\"mode\": \"%s\", \"threads\": %d, \"conns\": %d, \"size\": %zu, "
	       "\"seconds\": %.6f, \"ops\": %lu, \"failures\": %lu, \"connect_failures\": %lu, "
	       "\"io_failures\": %lu, \"timeouts\": %lu, \"incomplete\": %lu, \"overflows\": %lu, "
	       "\"connected\": %lu, \"bytes_sent\": %lu, \"bytes_received\": %lu",
	       MODE_NAMES[o.mode], o.threads, o.conns, o.mode == BULK ? (size_t)0 : o.size, elapsed,
	       (unsigned long)ops, (unsigned long)failures, (unsigned long)connect_failures,
	       (unsigned long)io_failures, (unsigned long)timeouts, (unsigned long)incomplete,
	       (unsigned long)overflows, (unsigned long)connected, (unsigned long)bytes_sent,
	       (unsigned long)bytes_received);
	if (o.mode == BULK) {
		double gbps = elapsed > 0 && ops ? (double)bytes_sent * 8 / elapsed / 1e9 : 0;
		printf(", \"mib\": %ld, \"gbps\": %.4f", o.mib, gbps);
	} else {
		double per_s = elapsed > 0 ? (double)ops / elapsed : 0;
		printf(", \"per_s\": %.2f, \"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, "
		       "\"max_us\": %.2f, \"samples\": %lu",
		       per_s, percentile_us(&all, 50), percentile_us(&all, 90), percentile_us(&all, 99),
		       (double)all.max / 1000.0, (unsigned long)all.total);
		if (o.mode == RATE)
			printf(", \"target_rate\": %.2f, \"sent\": %lu, \"answered\": %lu", o.rate,
			       (unsigned long)sent, (unsigned long)answered);
	}
	printf("}\n");
	fflush(stdout);
	return failures ? 2 : 0;
}
