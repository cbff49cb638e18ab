/*
 * weir_echo: a TCP echo server for the proxy benchmark, built to never be
 * what limits a measurement.
 *
 *   weir_echo --addr 10.244.2.3 --port 8080 [--backlog 4096] [--threads 1]
 *             [--buffer 131072]
 *
 * Every byte read is written back. A peer's EOF is answered, once all it
 * sent was written back, by shutdown(SHUT_WR) and close: a client that
 * half-closes still gets its whole echo. One epoll loop per thread; with
 * --threads N each thread has its own listener on the same port
 * (SO_REUSEPORT) and the kernel spreads connections over them.
 *
 * Prints "ready" on stdout once every listener is listening; exits with
 * status 0 on SIGTERM or SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 256

struct options {
	const char *addr;
	int port;
	int backlog;
	int threads;
	size_t buffer;
};

struct conn {
	int fd;
	size_t len;  /* bytes in buf not yet written back */
	size_t off;  /* of which `off` were written already */
	char buf[];
};

/* Marks the listener in epoll data (connections carry their struct conn *). */
static char listener_tag;

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void usage(const char *why)
{
	fprintf(stderr,
		"weir_echo: %s\n"
		"usage: weir_echo --addr IP --port PORT [--backlog N] [--threads N] [--buffer BYTES]\n",
		why);
	exit(1);
}

static long parse_long(const char *flag, const char *value, long lo, long hi)
{
	char *end;
	errno = 0;
	long v = strtol(value, &end, 10);
	if (errno || *end || end == value || v < lo || v > hi) {
		fprintf(stderr, "weir_echo: %s must be an integer in %ld..%ld, not %s\n", flag, lo, hi,
			value);
		exit(1);
	}
	return v;
}

static struct options parse(int argc, char **argv)
{
	struct options o = { .addr = NULL, .port = -1, .backlog = 4096, .threads = 1, .buffer = 131072 };
	for (int i = 1; i < argc; i++) {
		const char *flag = argv[i];
		if (i + 1 >= argc)
			usage("every option takes a value");
		const char *value = argv[++i];
		if (!strcmp(flag, "--addr"))
			o.addr = value;
		else if (!strcmp(flag, "--port"))
			o.port = (int)parse_long(flag, value, 1, 65535);
		else if (!strcmp(flag, "--backlog"))
			o.backlog = (int)parse_long(flag, value, 1, 65535);
		else if (!strcmp(flag, "--threads"))
			o.threads = (int)parse_long(flag, value, 1, 64);
		else if (!strcmp(flag, "--buffer"))
			o.buffer = (size_t)parse_long(flag, value, 1024, 64L << 20);
		else
			usage("unknown option");
	}
	if (!o.addr || o.port < 0)
		usage("--addr and --port are required");
	return o;
}

static int make_listener(const struct options *o)
{
	struct sockaddr_storage ss;
	socklen_t sslen;
	memset(&ss, 0, sizeof ss);
	struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
	if (inet_pton(AF_INET, o->addr, &sin->sin_addr) == 1) {
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)o->port);
		sslen = sizeof *sin;
	} else if (inet_pton(AF_INET6, o->addr, &sin6->sin6_addr) == 1) {
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons((uint16_t)o->port);
		sslen = sizeof *sin6;
	} else {
		fprintf(stderr, "weir_echo: --addr %s is not an IPv4 or IPv6 address\n", o->addr);
		exit(1);
	}
	int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die("socket");
	int one = 1;
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
		die("SO_REUSEADDR");
	if (o->threads > 1 && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
		die("SO_REUSEPORT");
	if (bind(fd, (struct sockaddr *)&ss, sslen) < 0)
		die("bind");
	if (listen(fd, o->backlog) < 0)
		die("listen");
	return fd;
}

static void drop(struct conn *c)
{
	close(c->fd); /* also leaves the epoll set: the fd is never duplicated */
	free(c);
}

static void want(int ep, struct conn *c, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };
	if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0)
		die("epoll_ctl MOD");
}

/* Writes back what is buffered. 1: all written, 0: the socket is full, -1: error. */
static int flush(struct conn *c)
{
	while (c->off < c->len) {
		ssize_t n = write(c->fd, c->buf + c->off, c->len - c->off);
		if (n > 0) {
			c->off += (size_t)n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			return 0;
		} else {
			return -1;
		}
	}
	c->len = c->off = 0;
	return 1;
}

/* Finishes a connection whose peer sent EOF and whose echo was all written. */
static void finish(struct conn *c)
{
	shutdown(c->fd, SHUT_WR);
	drop(c);
}

/* Reads and echoes until the socket has nothing more or cannot take more. */
static void serve(int ep, struct conn *c, size_t cap)
{
	for (int rounds = 0; rounds < 16; rounds++) {
		ssize_t n = read(c->fd, c->buf, cap);
		if (n == 0) {
			finish(c);
			return;
		}
		if (n < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EAGAIN || errno == EWOULDBLOCK)
				return;
			drop(c);
			return;
		}
		c->len = (size_t)n;
		c->off = 0;
		int r = flush(c);
		if (r < 0) {
			drop(c);
			return;
		}
		if (r == 0) {
			/* Stop reading until the peer takes what is pending: the
			 * buffer is bounded, TCP's window pushes back on the sender. */
			want(ep, c, EPOLLOUT);
			return;
		}
	}
}

struct worker {
	const struct options *o;
	int listener;
};

static void accept_all(int ep, int listener, size_t cap)
{
	for (;;) {
		int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EINTR || errno == ECONNABORTED)
				continue;
			/* EAGAIN: the queue is empty; EMFILE and the like: try later */
			return;
		}
		int one = 1;
		setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		struct conn *c = malloc(sizeof *c + cap);
		if (!c) {
			close(fd);
			continue;
		}
		c->fd = fd;
		c->len = c->off = 0;
		struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
			close(fd);
			free(c);
		}
	}
}

static void *run(void *arg)
{
	struct worker *w = arg;
	size_t cap = w->o->buffer;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &listener_tag };
	if (epoll_ctl(ep, EPOLL_CTL_ADD, w->listener, &ev) < 0)
		die("epoll_ctl ADD listener");
	struct epoll_event events[MAX_EVENTS];
	for (;;) {
		int n = epoll_wait(ep, events, MAX_EVENTS, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			if (events[i].data.ptr == &listener_tag) {
				accept_all(ep, w->listener, cap);
				continue;
			}
			struct conn *c = events[i].data.ptr;
			uint32_t e = events[i].events;
			if (c->len > c->off) {
				/* Waiting to write: only EPOLLOUT (or an error) was asked for. */
				int r = flush(c);
				if (r < 0) {
					drop(c);
				} else if (r > 0) {
					want(ep, c, EPOLLIN);
					serve(ep, c, cap);
				}
			} else if (e & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
				serve(ep, c, cap);
			}
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct options o = parse(argc, argv);
	sigset_t stop;
	sigemptyset(&stop);
	sigaddset(&stop, SIGTERM);
	sigaddset(&stop, SIGINT);
	/* Blocked before any thread starts, so only sigwait below sees them. */
	if (pthread_sigmask(SIG_BLOCK, &stop, NULL))
		die("pthread_sigmask");
	signal(SIGPIPE, SIG_IGN);

	struct worker *workers = calloc((size_t)o.threads, sizeof *workers);
	if (!workers)
		die("calloc");
	for (int i = 0; i < o.threads; i++) {
		workers[i].o = &o;
		workers[i].listener = make_listener(&o);
	}
	for (int i = 0; i < o.threads; i++) {
		pthread_t tid;
		if (pthread_create(&tid, NULL, run, &workers[i]))
			die("pthread_create");
		pthread_detach(tid);
	}
	printf("ready\n");
	fflush(stdout);
	int sig;
	sigwait(&stop, &sig);
	return 0;
}
