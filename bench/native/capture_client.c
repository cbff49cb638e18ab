/* capture_client: the capture benchmark's measuring client, run inside the
 * client pod.
 *
 *   capture_client --host IP --port P [--size S] [--connects N]
 *                  [--concurrency C] [--rate-seconds T] [--rr-seconds T]
 *                  [--timeout-ms MS] [--max-seconds X] [--cpu N]
 *
 * Three phases, each skipped when its count or duration is 0:
 *   latency: N connections, C at a time (each of C threads runs its share
 *     one after another): connect, send S bytes, read the S-byte echo,
 *     close. Per connection it records the connect() time and the connect
 *     plus request/response time, in ns (socket() and setsockopt are
 *     before the clock starts, close after it stops).
 *   rate: for T seconds, C threads each open, send S, read S, close, again.
 *   rr: for T seconds, C threads each send S and read S on one connection.
 * Prints one JSON object: percentiles in us, counts, failures, and
 * "connections", every connect() that succeeded in any phase (what a relay
 * in between must have accepted). A failed connection (refused, reset,
 * timed out, short or wrong echo) counts as a failure and the phase goes
 * on. Every socket call is bounded by --timeout-ms (SO_SNDTIMEO bounds
 * connect() too); the whole run is killed by SIGALRM after --max-seconds. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTS 1000000L
#define MAX_CONCURRENCY 256L
#define MAX_SIZE 65536L

static struct sockaddr_in target;
static long size = 1, connects = 0, concurrency = 1, timeout_ms = 2000;
static double rate_seconds = 0, rr_seconds = 0;
static char *request;

/* latency phase */
static atomic_long next_index;
static int64_t *connect_ns, *total_ns; /* -1 where the connection failed */

struct worker {
	pthread_t thread;
	long done;
	long failures;
	long connected; /* connect() calls that succeeded */
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void usage(const char *why)
{
	fprintf(stderr,
		"capture_client: %s\n"
		"usage: capture_client --host IP --port P [--size S] [--connects N] "
		"[--concurrency C] [--rate-seconds T] [--rr-seconds T] [--timeout-ms MS] "
		"[--max-seconds X] [--cpu N]\n",
		why);
	exit(2);
}

static long parse_long(const char *flag, const char *text, long lo, long hi)
{
	char *end = NULL;
	errno = 0;
	long v = strtol(text, &end, 10);
	if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "capture_client: %s wants an integer in [%ld, %ld], got '%s'\n", flag,
			lo, hi, text);
		exit(2);
	}
	return v;
}

static double parse_seconds(const char *flag, const char *text)
{
	char *end = NULL;
	errno = 0;
	double v = strtod(text, &end);
	if (errno != 0 || end == text || *end != '\0' || !(v >= 0 && v <= 60)) {
		fprintf(stderr, "capture_client: %s wants seconds in [0, 60], got '%s'\n", flag,
			text);
		exit(2);
	}
	return v;
}

/* A blocking socket whose every call, connect() included, gives up after
 * timeout_ms; -1 on failure. */
static int new_socket(void)
{
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
	int one = 1;
	if (setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0 ||
	    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
	    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Send the request and read its echo back whole; 0 on success. */
static int round_trip(int fd, char *reply)
{
	long sent = 0;
	while (sent < size) {
		ssize_t n = send(fd, request + sent, (size_t)(size - sent), MSG_NOSIGNAL);
		if (n <= 0)
			return -1;
		sent += n;
	}
	long got = 0;
	while (got < size) {
		ssize_t n = recv(fd, reply + got, (size_t)(size - got), 0);
		if (n <= 0)
			return -1;
		got += n;
	}
	return memcmp(request, reply, (size_t)size) == 0 ? 0 : -1;
}

static void *latency_worker(void *arg)
{
	struct worker *w = arg;
	char *reply = malloc((size_t)size);
	if (!reply)
		abort();
	for (;;) {
		long i = atomic_fetch_add(&next_index, 1);
		if (i >= connects)
			break;
		connect_ns[i] = total_ns[i] = -1;
		int fd = new_socket();
		if (fd < 0) {
			w->failures++;
			continue;
		}
		int64_t t0 = now_ns();
		if (connect(fd, (struct sockaddr *)&target, sizeof(target)) != 0) {
			close(fd);
			w->failures++;
			continue;
		}
		int64_t t1 = now_ns();
		w->connected++;
		int bad = round_trip(fd, reply);
		int64_t t2 = now_ns();
		close(fd);
		if (bad) {
			w->failures++;
			continue;
		}
		connect_ns[i] = t1 - t0;
		total_ns[i] = t2 - t0;
		w->done++;
	}
	free(reply);
	return NULL;
}

static int64_t deadline;

static void *rate_worker(void *arg)
{
	struct worker *w = arg;
	char *reply = malloc((size_t)size);
	if (!reply)
		abort();
	while (now_ns() < deadline) {
		int fd = new_socket();
		int ok = fd >= 0 && connect(fd, (struct sockaddr *)&target, sizeof(target)) == 0;
		if (ok)
			w->connected++;
		if (!ok || round_trip(fd, reply) != 0) {
			w->failures++;
		} else {
			w->done++;
		}
		if (fd >= 0)
			close(fd);
	}
	free(reply);
	return NULL;
}

static void *rr_worker(void *arg)
{
	struct worker *w = arg;
	char *reply = malloc((size_t)size);
	if (!reply)
		abort();
	int fd = -1;
	while (now_ns() < deadline) {
		if (fd < 0) {
			fd = new_socket();
			if (fd >= 0 && connect(fd, (struct sockaddr *)&target, sizeof(target)) != 0) {
				close(fd);
				fd = -1;
			}
			if (fd < 0) {
				w->failures++;
				continue;
			}
			w->connected++;
		}
		if (round_trip(fd, reply) != 0) {
			w->failures++;
			close(fd);
			fd = -1;
			continue;
		}
		w->done++;
	}
	if (fd >= 0)
		close(fd);
	free(reply);
	return NULL;
}

static long connections; /* successful connect() calls, all phases */

/* Runs fn on `concurrency` threads; totals in *done and *failures. */
static void run_workers(void *(*fn)(void *), long *done, long *failures)
{
	struct worker *ws = calloc((size_t)concurrency, sizeof(*ws));
	if (!ws)
		abort();
	for (long i = 0; i < concurrency; i++) {
		int err = pthread_create(&ws[i].thread, NULL, fn, &ws[i]);
		if (err != 0) {
			fprintf(stderr, "capture_client: pthread_create: %s\n", strerror(err));
			exit(2);
		}
	}
	*done = *failures = 0;
	for (long i = 0; i < concurrency; i++) {
		pthread_join(ws[i].thread, NULL);
		*done += ws[i].done;
		*failures += ws[i].failures;
		connections += ws[i].connected;
	}
	free(ws);
}

static int cmp_i64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* Nearest-rank percentiles of the successful samples, in us. */
static void print_percentiles(const char *name, int64_t *ns, long n)
{
	long k = 0;
	for (long i = 0; i < n; i++)
		if (ns[i] >= 0)
			ns[k++] = ns[i];
	printf("\"%s\": {", name);
	if (k == 0) {
		printf("\"p50\": null, \"p90\": null, \"p99\": null, \"max\": null}");
		return;
	}
	qsort(ns, (size_t)k, sizeof(*ns), cmp_i64);
	const double ps[] = {50, 90, 99};
	const char *names[] = {"p50", "p90", "p99"};
	for (int j = 0; j < 3; j++) {
		long rank = (long)ceil((ps[j] / 100.0) * (double)k);
		if (rank < 1)
			rank = 1;
		printf("\"%s\": %.3f, ", names[j], (double)ns[rank - 1] / 1000.0);
	}
	printf("\"max\": %.3f}", (double)ns[k - 1] / 1000.0);
}

int main(int argc, char **argv)
{
	const char *host = NULL;
	long port = -1, max_seconds = 120, cpu = -1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (i + 1 >= argc)
			usage("missing value");
		const char *v = argv[++i];
		if (strcmp(a, "--host") == 0)
			host = v;
		else if (strcmp(a, "--port") == 0)
			port = parse_long(a, v, 1, 65535);
		else if (strcmp(a, "--size") == 0)
			size = parse_long(a, v, 1, MAX_SIZE);
		else if (strcmp(a, "--connects") == 0)
			connects = parse_long(a, v, 0, MAX_CONNECTS);
		else if (strcmp(a, "--concurrency") == 0)
			concurrency = parse_long(a, v, 1, MAX_CONCURRENCY);
		else if (strcmp(a, "--rate-seconds") == 0)
			rate_seconds = parse_seconds(a, v);
		else if (strcmp(a, "--rr-seconds") == 0)
			rr_seconds = parse_seconds(a, v);
		else if (strcmp(a, "--timeout-ms") == 0)
			timeout_ms = parse_long(a, v, 1, 60000);
		else if (strcmp(a, "--max-seconds") == 0)
			max_seconds = parse_long(a, v, 1, 3600);
		else if (strcmp(a, "--cpu") == 0)
			cpu = parse_long(a, v, 0, CPU_SETSIZE - 1);
		else
			usage("unknown flag");
	}
	if (!host || port < 0)
		usage("--host and --port are required");
	target.sin_family = AF_INET;
	target.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &target.sin_addr) != 1)
		usage("--host must be an IPv4 address");
	if (cpu >= 0) {
		cpu_set_t set;
		CPU_ZERO(&set);
		CPU_SET((int)cpu, &set);
		if (sched_setaffinity(0, sizeof(set), &set) != 0) {
			perror("capture_client: sched_setaffinity");
			return 2;
		}
	}
	/* The hard bound: whatever hangs, the process ends (killed, status
	 * 128+SIGALRM) after max_seconds. */
	alarm((unsigned int)max_seconds);

	request = malloc((size_t)size);
	connect_ns = calloc((size_t)(connects ? connects : 1), sizeof(int64_t));
	total_ns = calloc((size_t)(connects ? connects : 1), sizeof(int64_t));
	if (!request || !connect_ns || !total_ns)
		abort();
	for (long i = 0; i < size; i++)
		request[i] = (char)('a' + i % 26);

	long lat_done = 0, lat_failures = 0;
	if (connects > 0)
		run_workers(latency_worker, &lat_done, &lat_failures);

	long rate_done = 0, rate_failures = 0;
	int64_t started = now_ns();
	deadline = started + (int64_t)(rate_seconds * 1e9);
	if (rate_seconds > 0)
		run_workers(rate_worker, &rate_done, &rate_failures);
	double rate_elapsed = (double)(now_ns() - started) / 1e9;

	long rr_done = 0, rr_failures = 0;
	started = now_ns();
	deadline = started + (int64_t)(rr_seconds * 1e9);
	if (rr_seconds > 0)
		run_workers(rr_worker, &rr_done, &rr_failures);
	double rr_elapsed = (double)(now_ns() - started) / 1e9;

	printf("{\"size\": %ld, \"concurrency\": %ld, \"connections\": %ld, ", size, concurrency,
	       connections);
	printf("\"latency\": {\"connects\": %ld, \"ok\": %ld, \"failures\": %ld, ", connects,
	       lat_done, lat_failures);
	print_percentiles("connect_us", connect_ns, connects);
	printf(", ");
	print_percentiles("connect_rr_us", total_ns, connects);
	printf("}, ");
	printf("\"rate\": {\"seconds\": %.3f, \"conns\": %ld, \"failures\": %ld, \"per_s\": %.1f}, ",
	       rate_elapsed, rate_done, rate_failures,
	       rate_seconds > 0 ? (double)rate_done / rate_elapsed : 0.0);
	printf("\"rr\": {\"seconds\": %.3f, \"requests\": %ld, \"failures\": %ld, \"per_s\": %.1f}}\n",
	       rr_elapsed, rr_done, rr_failures, rr_seconds > 0 ? (double)rr_done / rr_elapsed : 0.0);
	free(request);
	free(connect_ns);
	free(total_ns);
	return 0;
}
