/* capture_standin: the capture benchmark's stand-in for the node proxy's
 * outbound listener.
 *
 *   capture_standin --port 15001 --mark 0x539 [--cpu N]
 *
 * It listens on --port inside the captured pod and does for each
 * connection what the real proxy does before its own work starts: it asks
 * getsockopt(SOL_IP, SO_ORIGINAL_DST) where the client was going (iptables
 * answers through conntrack, the eBPF mode through its cgroup/getsockopt
 * program: one call for both, as node_agent/proxy/original_dst.py), opens
 * the upstream with SO_MARK = --mark so capture lets it through, and relays
 * both ways with a half-close passed on.
 *
 * One thread, epoll, non-blocking sockets: the benchmark measures the
 * capture path, so this must cost as little as possible per connection.
 * Prints "ready" once listening. SIGUSR1 prints the counters as one JSON
 * line; SIGTERM or SIGINT prints them and exits 0. The counters let a test
 * prove a captured connection really came through here. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define SO_ORIGINAL_DST 80 /* linux/netfilter_ipv4.h */
#define BUF_SIZE 16384
#define MAX_EVENTS 256
#define BACKLOG 4096

/* One direction of a relay. */
struct pipe_half {
	char buf[BUF_SIZE];
	size_t len; /* bytes in buf not yet written */
	size_t off; /* first unwritten byte */
	int eof;    /* the reading side sent FIN */
	int shut;   /* FIN passed on to the writing side */
};

struct conn;

/* What an epoll event points at: one socket of a connection. */
struct endpoint {
	struct conn *conn;
	int fd;
	int is_upstream;
	uint32_t armed; /* the events epoll waits for now */
};

struct conn {
	struct endpoint down; /* the accepted client */
	struct endpoint up;   /* to the original destination; fd -1 until opened */
	int connecting;       /* upstream connect in progress */
	struct pipe_half to_up;   /* client -> upstream */
	struct pipe_half to_down; /* upstream -> client */
	int dead;                 /* closed; freed once the current batch is done */
	struct conn *next_dead;
};

static struct {
	unsigned long long accepted;
	unsigned long long completed; /* both directions ended cleanly */
	unsigned long long original_dst_failures;
	unsigned long long upstream_failures;
	unsigned long long reset; /* ended by an error on either side */
	unsigned long long open;
} stats;

static int epfd;
static struct conn *dead_list;
static unsigned int mark;
static int listen_marker; /* its address tags the listener's epoll events */
static int signal_marker;

static void die(const char *what)
{
	fprintf(stderr, "capture_standin: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void usage(const char *why)
{
	fprintf(stderr,
		"capture_standin: %s\n"
		"usage: capture_standin --port P --mark M [--cpu N]\n",
		why);
	exit(2);
}

static long parse_long(const char *flag, const char *text, long lo, long hi)
{
	char *end = NULL;
	errno = 0;
	long v = strtol(text, &end, 0);
	if (errno != 0 || end == text || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "capture_standin: %s wants an integer in [%ld, %ld], got '%s'\n",
			flag, lo, hi, text);
		exit(2);
	}
	return v;
}

static void print_stats(void)
{
	printf("{\"accepted\": %llu, \"completed\": %llu, \"original_dst_failures\": %llu, "
	       "\"upstream_failures\": %llu, \"reset\": %llu, \"open\": %llu}\n",
	       stats.accepted, stats.completed, stats.original_dst_failures,
	       stats.upstream_failures, stats.reset, stats.open);
	fflush(stdout);
}

static void conn_close(struct conn *c, int clean)
{
	if (clean)
		stats.completed++;
	else
		stats.reset++;
	stats.open--;
	close(c->down.fd);
	if (c->up.fd >= 0)
		close(c->up.fd);
	/* Events of this epoll batch may still point at c: free it after. */
	c->dead = 1;
	c->next_dead = dead_list;
	dead_list = c;
}

static void free_dead(void)
{
	while (dead_list) {
		struct conn *c = dead_list;
		dead_list = c->next_dead;
		free(c);
	}
}

static void set_nodelay(int fd)
{
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* The events each socket waits for follow from the buffers: read while the
 * buffer toward the other side is empty and the peer has not closed, write
 * while bytes are pending toward it. */
static void rearm(struct conn *c, struct endpoint *ep, int add)
{
	struct pipe_half *from = ep->is_upstream ? &c->to_down : &c->to_up;
	struct pipe_half *into = ep->is_upstream ? &c->to_up : &c->to_down;
	struct epoll_event ev = {.data.ptr = ep};
	if (c->connecting && ep->is_upstream)
		ev.events = EPOLLOUT;
	else if (!c->connecting) {
		if (!from->eof && from->len == 0)
			ev.events |= EPOLLIN;
		if (into->len > 0)
			ev.events |= EPOLLOUT;
	}
	/* In a steady request/response nothing changes: skip the syscall. */
	if (!add && ev.events == ep->armed)
		return;
	if (epoll_ctl(epfd, add ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, ep->fd, &ev) != 0)
		die("epoll_ctl");
	ep->armed = ev.events;
}

/* Write what is pending; 0 when done or would block, -1 on error. */
static int flush(int fd, struct pipe_half *h)
{
	while (h->len > 0) {
		ssize_t n = send(fd, h->buf + h->off, h->len, MSG_NOSIGNAL);
		if (n < 0)
			return errno == EAGAIN ? 0 : -1;
		h->off += (size_t)n;
		h->len -= (size_t)n;
	}
	h->off = 0;
	if (h->eof && !h->shut) {
		h->shut = 1;
		if (shutdown(fd, SHUT_WR) != 0)
			return -1;
	}
	return 0;
}

static int finished(const struct conn *c)
{
	return c->to_up.shut && c->to_down.shut;
}

static void on_accept(int lfd)
{
	for (int i = 0; i < 64; i++) {
		int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			if (errno == EAGAIN || errno == ECONNABORTED || errno == EINTR)
				return;
			die("accept4");
		}
		stats.accepted++;
		set_nodelay(fd);
		struct conn *c = calloc(1, sizeof(*c));
		if (!c)
			die("calloc");
		stats.open++;
		c->down = (struct endpoint){.conn = c, .fd = fd, .is_upstream = 0};
		c->up = (struct endpoint){.conn = c, .fd = -1, .is_upstream = 1};
		struct sockaddr_in dst;
		socklen_t len = sizeof(dst);
		if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dst, &len) != 0) {
			stats.original_dst_failures++;
			conn_close(c, 0);
			continue;
		}
		int up = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
		if (up < 0)
			die("socket");
		c->up.fd = up;
		if (setsockopt(up, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0)
			die("setsockopt SO_MARK");
		set_nodelay(up);
		if (connect(up, (struct sockaddr *)&dst, sizeof(dst)) != 0 && errno != EINPROGRESS) {
			stats.upstream_failures++;
			conn_close(c, 0);
			continue;
		}
		c->connecting = 1;
		/* The client is registered with no events until the upstream is up:
		 * its first bytes wait in its own receive buffer meanwhile. */
		rearm(c, &c->down, 1);
		rearm(c, &c->up, 1);
	}
}

static void on_socket(struct endpoint *ep, uint32_t events)
{
	struct conn *c = ep->conn;
	if (c->dead)
		return;
	if (c->connecting && !ep->is_upstream) {
		/* The client gave up before the upstream answered. */
		if (events & (EPOLLHUP | EPOLLERR))
			conn_close(c, 0);
		return;
	}
	if (c->connecting) {
		int err = 0;
		socklen_t len = sizeof(err);
		getsockopt(ep->fd, SOL_SOCKET, SO_ERROR, &err, &len);
		if (err != 0) {
			stats.upstream_failures++;
			conn_close(c, 0);
			return;
		}
		c->connecting = 0;
		rearm(c, &c->down, 0);
		rearm(c, &c->up, 0);
		return;
	}
	struct endpoint *other = ep->is_upstream ? &c->down : &c->up;
	struct pipe_half *from = ep->is_upstream ? &c->to_down : &c->to_up;
	struct pipe_half *into = ep->is_upstream ? &c->to_up : &c->to_down;
	if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
		if (!from->eof && from->len == 0) {
			ssize_t n = recv(ep->fd, from->buf, BUF_SIZE, 0);
			if (n == 0)
				from->eof = 1;
			else if (n > 0)
				from->len = (size_t)n;
			else if (errno != EAGAIN) {
				conn_close(c, 0);
				return;
			}
			if (flush(other->fd, from) != 0) {
				conn_close(c, 0);
				return;
			}
		} else if (events & EPOLLERR) {
			conn_close(c, 0);
			return;
		}
	}
	if ((events & EPOLLOUT) && flush(ep->fd, into) != 0) {
		conn_close(c, 0);
		return;
	}
	if (finished(c)) {
		conn_close(c, 1);
		return;
	}
	rearm(c, ep, 0);
	rearm(c, other, 0);
}

static void pin(long cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET((int)cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity");
}

int main(int argc, char **argv)
{
	long port = -1, cpu = -1;
	int have_mark = 0;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (i + 1 >= argc)
			usage("missing value");
		const char *v = argv[++i];
		if (strcmp(a, "--port") == 0)
			port = parse_long(a, v, 1, 65535);
		else if (strcmp(a, "--mark") == 0) {
			mark = (unsigned int)parse_long(a, v, 1, UINT_MAX);
			have_mark = 1;
		} else if (strcmp(a, "--cpu") == 0)
			cpu = parse_long(a, v, 0, CPU_SETSIZE - 1);
		else
			usage("unknown flag");
	}
	if (port < 0 || !have_mark)
		usage("--port and --mark are required");
	if (cpu >= 0)
		pin(cpu);

	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGTERM);
	sigaddset(&mask, SIGINT);
	sigaddset(&mask, SIGUSR1);
	sigaddset(&mask, SIGPIPE);
	if (sigprocmask(SIG_BLOCK, &mask, NULL) != 0)
		die("sigprocmask");
	int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (sfd < 0)
		die("signalfd");

	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket");
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		die("bind");
	if (listen(lfd, BACKLOG) != 0)
		die("listen");

	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0)
		die("epoll_create1");
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listen_marker};
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &ev) != 0)
		die("epoll_ctl listener");
	ev = (struct epoll_event){.events = EPOLLIN, .data.ptr = &signal_marker};
	if (epoll_ctl(epfd, EPOLL_CTL_ADD, sfd, &ev) != 0)
		die("epoll_ctl signalfd");

	printf("ready\n");
	fflush(stdout);

	struct epoll_event events[MAX_EVENTS];
	for (;;) {
		int n = epoll_wait(epfd, events, MAX_EVENTS, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			void *p = events[i].data.ptr;
			if (p == &listen_marker) {
				on_accept(lfd);
			} else if (p == &signal_marker) {
				struct signalfd_siginfo si;
				while (read(sfd, &si, sizeof(si)) == (ssize_t)sizeof(si)) {
					if (si.ssi_signo == SIGUSR1) {
						print_stats();
					} else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) {
						print_stats();
						return 0;
					}
				}
			} else {
				on_socket(p, events[i].events);
			}
		}
		free_dead();
	}
}
