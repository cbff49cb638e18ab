/*
 * weir-cni front end: the fast paths of the plugin in C, everything else in Python.
 *
 * A runtime starts weir-cni for every pod, and a frozen Python plugin spends
 * over 100 ms starting its interpreter before it reads a byte. This front end is
 * the `weir-cni` executable of the bundle (scripts/build-cni-plugin.sh). It
 * handles, itself:
 *
 *   VERSION   always (when stdin is JSON it can read);
 *   ADD, DEL  when the environment and the network config are well formed
 *             and the agent's socket accepts the connection.
 *
 * In every other case (CHECK, STATUS, GC, bad input of any kind, a config using
 * JSON escapes in a value it needs, the agent socket refusing the connection) it
 * has written nothing and sent nothing, and it execs the frozen Python plugin
 * (`weir-cni-py`, next to this executable) with the same environment and the
 * same stdin. cni_plugin/main.py stays the one reference for every behaviour;
 * what this file does must be exactly what it does, and the plugin tests run
 * both (tests/unit/test_cni_plugin.py).
 *
 * Once a request is on the agent's socket, this program sees it through to the
 * end (the agent must not get it twice), so it also formats the outcomes that
 * main.py gives after an exchange: a refusal, a timeout, a reset, nonsense.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* The same values as cni_plugin/request.py, protocol.py and spec.py. */
#define MAX_STDIN (1 << 20)
#define MAX_FRAME (1 << 20)
#define PROTOCOL_VERSION "1"
#define DEFAULT_AGENT_SOCKET "/var/run/weir/cni.sock"
#define DEFAULT_EXCLUDE_NAMESPACE "kube-system"
#define DEFAULT_AGENT_NAMESPACE "weir-system"
#define DEFAULT_AGENT_TIMEOUT_S 10.0
#define MAX_AGENT_TIMEOUT_S 120.0
#define SHORT_TIMEOUT_S 5.0
#define LATEST_VERSION "1.1.0"
#define ERR_TRY_AGAIN_LATER 11
#define ERR_CAPTURE_REFUSED 100
#define ERR_AGENT_PROTOCOL 101
#define ERR_INTERNAL 999
#define MAX_DEPTH 64
#define MAX_NAMESPACES 64
#define MAX_IPS 64
/* The frozen Python plugin, in the same directory as this executable. */
#define FALLBACK_NAME "weir-cni-py"

static const char *const SUPPORTED_VERSIONS[] = {"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"};
#define N_SUPPORTED (sizeof SUPPORTED_VERSIONS / sizeof SUPPORTED_VERSIONS[0])

/* What a handler returns when the Python plugin must take over. */
#define FALLBACK (-1)

/* -- growable buffers ------------------------------------------------------ */

struct buf {
	char *data;
	size_t len, cap;
};

static void die_oom(void)
{
	/* No JSON can be trusted to fit anymore; the runtime sees a failed plugin. */
	fputs("weir-cni: out of memory\n", stderr);
	exit(1);
}

static void buf_add(struct buf *b, const char *p, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *data = realloc(b->data, cap);
		if (!data)
			die_oom();
		b->data = data;
		b->cap = cap;
	}
	memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len] = '\0';
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) static void buf_fmt(struct buf *b, const char *fmt, ...)
{
	char small[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(small, sizeof small, fmt, ap);
	va_end(ap);
	if (n < 0)
		die_oom();
	if ((size_t)n < sizeof small) {
		buf_add(b, small, (size_t)n);
		return;
	}
	char *big = malloc((size_t)n + 1);
	if (!big)
		die_oom();
	va_start(ap, fmt);
	vsnprintf(big, (size_t)n + 1, fmt, ap);
	va_end(ap);
	buf_add(b, big, (size_t)n);
	free(big);
}

/* -- UTF-8 ----------------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at p (1..4), or 0. Surrogates are invalid. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end, uint32_t *cp)
{
	unsigned char c = p[0];
	size_t n;
	uint32_t v, min;
	if (c < 0x80) {
		*cp = c;
		return 1;
	}
	if (c >= 0xc2 && c <= 0xdf) {
		n = 2, v = c & 0x1f, min = 0x80;
	} else if (c >= 0xe0 && c <= 0xef) {
		n = 3, v = c & 0x0f, min = 0x800;
	} else if (c >= 0xf0 && c <= 0xf4) {
		n = 4, v = c & 0x07, min = 0x10000;
	} else {
		return 0;
	}
	if ((size_t)(end - p) < n)
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		v = (v << 6) | (p[i] & 0x3f);
	}
	if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
		return 0;
	*cp = v;
	return n;
}

static bool valid_utf8(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s, *end = p + n;
	uint32_t cp;
	while (p < end) {
		size_t k = utf8_seq(p, end, &cp);
		if (!k)
			return false;
		p += k;
	}
	return true;
}

static void utf8_put(struct buf *b, uint32_t cp)
{
	char s[4];
	size_t n;
	if (cp < 0x80) {
		s[0] = (char)cp, n = 1;
	} else if (cp < 0x800) {
		s[0] = (char)(0xc0 | (cp >> 6)), s[1] = (char)(0x80 | (cp & 0x3f)), n = 2;
	} else if (cp < 0x10000) {
		s[0] = (char)(0xe0 | (cp >> 12)), s[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		s[2] = (char)(0x80 | (cp & 0x3f)), n = 3;
	} else {
		s[0] = (char)(0xf0 | (cp >> 18)), s[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		s[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), s[3] = (char)(0x80 | (cp & 0x3f)), n = 4;
	}
	buf_add(b, s, n);
}

/* A JSON string of valid UTF-8 text, escaped the way Python's json.dumps does (ensure_ascii). */
static void buf_json(struct buf *b, const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s, *end = p + n;
	buf_add(b, "\"", 1);
	while (p < end) {
		uint32_t cp;
		size_t k = utf8_seq(p, end, &cp);
		if (!k) /* callers pass validated text only */
			cp = 0xfffd, k = 1;
		p += k;
		switch (cp) {
		case '"': buf_str(b, "\\\""); break;
		case '\\': buf_str(b, "\\\\"); break;
		case '\n': buf_str(b, "\\n"); break;
		case '\r': buf_str(b, "\\r"); break;
		case '\t': buf_str(b, "\\t"); break;
		case '\b': buf_str(b, "\\b"); break;
		case '\f': buf_str(b, "\\f"); break;
		default:
			if (cp >= 0x20 && cp < 0x7f) {
				char c = (char)cp;
				buf_add(b, &c, 1);
			} else if (cp < 0x10000) {
				buf_fmt(b, "\\u%04x", (unsigned)cp);
			} else {
				cp -= 0x10000;
				buf_fmt(b, "\\u%04x\\u%04x", (unsigned)(0xd800 | (cp >> 10)),
					(unsigned)(0xdc00 | (cp & 0x3ff)));
			}
		}
	}
	buf_add(b, "\"", 1);
}

static void buf_json_str(struct buf *b, const char *s) { buf_json(b, s, strlen(s)); }

/* -- JSON (RFC 8259, as strict as Python's json.loads minus NaN/Infinity) -- */

enum jtype { J_OBJECT, J_ARRAY, J_STRING, J_NUMBER, J_TRUE, J_FALSE, J_NULL };

/* One value: its type and its text (a string's includes the quotes). */
struct jval {
	enum jtype type;
	const char *start, *end;
};

struct jparser {
	const char *p, *end;
	int depth;
};

static void skip_ws(struct jparser *ps)
{
	while (ps->p < ps->end &&
	       (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
		ps->p++;
}

static bool is_hex(char c)
{
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static bool parse_value(struct jparser *ps, struct jval *out);

static bool parse_string(struct jparser *ps)
{
	ps->p++; /* the opening quote */
	while (ps->p < ps->end) {
		unsigned char c = (unsigned char)*ps->p;
		if (c == '"') {
			ps->p++;
			return true;
		}
		if (c < 0x20)
			return false;
		if (c == '\\') {
			if (ps->end - ps->p < 2)
				return false;
			char e = ps->p[1];
			if (e == 'u') {
				if (ps->end - ps->p < 6)
					return false;
				for (int i = 2; i < 6; i++)
					if (!is_hex(ps->p[i]))
						return false;
				ps->p += 6;
			} else if (e && strchr("\"\\/bfnrt", e)) {
				ps->p += 2;
			} else {
				return false;
			}
			continue;
		}
		uint32_t cp;
		size_t k = utf8_seq((const unsigned char *)ps->p, (const unsigned char *)ps->end, &cp);
		if (!k)
			return false;
		ps->p += k;
	}
	return false;
}

static bool parse_number(struct jparser *ps)
{
	const char *p = ps->p, *end = ps->end;
	if (p < end && *p == '-')
		p++;
	if (p < end && *p == '0') {
		p++;
	} else if (p < end && is_digit(*p)) {
		while (p < end && is_digit(*p))
			p++;
	} else {
		return false;
	}
	if (p < end && *p == '.') {
		p++;
		if (!(p < end && is_digit(*p)))
			return false;
		while (p < end && is_digit(*p))
			p++;
	}
	if (p < end && (*p == 'e' || *p == 'E')) {
		p++;
		if (p < end && (*p == '+' || *p == '-'))
			p++;
		if (!(p < end && is_digit(*p)))
			return false;
		while (p < end && is_digit(*p))
			p++;
	}
	ps->p = p;
	return true;
}

static bool parse_literal(struct jparser *ps, const char *word)
{
	size_t n = strlen(word);
	if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0)
		return false;
	ps->p += n;
	return true;
}

/* Members (or elements) of a container; `close` is '}' or ']'. */
static bool parse_container(struct jparser *ps, char close)
{
	if (++ps->depth > MAX_DEPTH)
		return false;
	ps->p++;
	skip_ws(ps);
	if (ps->p < ps->end && *ps->p == close) {
		ps->p++;
		ps->depth--;
		return true;
	}
	for (;;) {
		struct jval v;
		if (close == '}') {
			skip_ws(ps);
			if (!(ps->p < ps->end && *ps->p == '"') || !parse_string(ps))
				return false;
			skip_ws(ps);
			if (!(ps->p < ps->end && *ps->p == ':'))
				return false;
			ps->p++;
		}
		if (!parse_value(ps, &v))
			return false;
		skip_ws(ps);
		if (ps->p < ps->end && *ps->p == ',') {
			ps->p++;
			continue;
		}
		if (ps->p < ps->end && *ps->p == close) {
			ps->p++;
			ps->depth--;
			return true;
		}
		return false;
	}
}

static bool parse_value(struct jparser *ps, struct jval *out)
{
	skip_ws(ps);
	if (ps->p >= ps->end)
		return false;
	out->start = ps->p;
	bool ok;
	switch (*ps->p) {
	case '{': out->type = J_OBJECT, ok = parse_container(ps, '}'); break;
	case '[': out->type = J_ARRAY, ok = parse_container(ps, ']'); break;
	case '"': out->type = J_STRING, ok = parse_string(ps); break;
	case 't': out->type = J_TRUE, ok = parse_literal(ps, "true"); break;
	case 'f': out->type = J_FALSE, ok = parse_literal(ps, "false"); break;
	case 'n': out->type = J_NULL, ok = parse_literal(ps, "null"); break;
	default: out->type = J_NUMBER, ok = parse_number(ps); break;
	}
	out->end = ps->p;
	return ok;
}

/* A whole document: one value and nothing but whitespace around it. */
static bool parse_document(const char *p, size_t n, struct jval *out)
{
	struct jparser ps = {p, p + n, 0};
	if (!parse_value(&ps, out))
		return false;
	skip_ws(&ps);
	return ps.p == ps.end;
}

/* Iterate a parsed container: start with *it = NULL; false when there is no more. */
static bool next_item(const struct jval *container, const char **it, struct jval *key,
		      struct jval *val)
{
	struct jparser ps = {*it ? *it : container->start + 1, container->end - 1, 0};
	skip_ws(&ps);
	if (ps.p < ps.end && *ps.p == ',')
		ps.p++;
	skip_ws(&ps);
	if (ps.p >= ps.end)
		return false;
	if (container->type == J_OBJECT) {
		if (!parse_value(&ps, key))
			return false;
		skip_ws(&ps);
		ps.p++; /* the colon */
	}
	if (!parse_value(&ps, val))
		return false;
	*it = ps.p;
	return true;
}

static bool jval_is(const struct jval *v, const char *text)
{
	size_t n = strlen(text);
	return (size_t)(v->end - v->start) == n && memcmp(v->start, text, n) == 0;
}

/* A string's text when it holds no escape (so the text is its value). */
static bool plain_string(const struct jval *v, const char **s, size_t *n)
{
	if (v->type != J_STRING || memchr(v->start + 1, '\\', (size_t)(v->end - v->start - 2)))
		return false;
	*s = v->start + 1;
	*n = (size_t)(v->end - v->start - 2);
	return true;
}

/* Key `name` of an object (the last one, as Python's dict keeps); keys with escapes fail. */
static bool member(const struct jval *obj, const char *name, struct jval *val, bool *escaped)
{
	const char *it = NULL;
	struct jval k, v;
	bool found = false;
	size_t n = strlen(name);
	while (next_item(obj, &it, &k, &v)) {
		const char *s;
		size_t len;
		if (!plain_string(&k, &s, &len))
			*escaped = true;
		else if (len == n && memcmp(s, name, n) == 0)
			*val = v, found = true;
	}
	return found;
}

static int hexval(char c)
{
	return is_digit(c) ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : c - 'A' + 10;
}

/* A parsed string's value as UTF-8; false for a lone surrogate (not text). */
static bool decode_string(const struct jval *v, struct buf *out)
{
	buf_add(out, "", 0);
	for (const char *p = v->start + 1; p < v->end - 1;) {
		if (*p != '\\') {
			const char *q = p;
			while (q < v->end - 1 && *q != '\\')
				q++;
			buf_add(out, p, (size_t)(q - p));
			p = q;
			continue;
		}
		char e = p[1];
		if (e != 'u') {
			const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
			buf_add(out, &to[strchr(from, e) - from], 1);
			p += 2;
			continue;
		}
		uint32_t cp = 0;
		for (int i = 2; i < 6; i++)
			cp = (cp << 4) | (uint32_t)hexval(p[i]);
		p += 6;
		if (cp >= 0xdc00 && cp <= 0xdfff)
			return false;
		if (cp >= 0xd800 && cp <= 0xdbff) {
			if (!(v->end - 1 - p >= 6 && p[0] == '\\' && p[1] == 'u'))
				return false;
			uint32_t lo = 0;
			for (int i = 2; i < 6; i++)
				lo = (lo << 4) | (uint32_t)hexval(p[i]);
			if (lo < 0xdc00 || lo > 0xdfff)
				return false;
			p += 6;
			cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
		}
		utf8_put(out, cp);
	}
	return true;
}

/* -- the invocation ----------------------------------------------------------- */

struct text {
	const char *s;
	size_t n;
};

struct pod {
	const char *container_id, *netns, *ifname;
	struct text namespace, name, uid;
	struct text ips[MAX_IPS];
	size_t n_ips;
};

struct config {
	const char *version; /* one of SUPPORTED_VERSIONS */
	struct jval prev_result;
	bool has_prev_result;
	char socket_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct text exclude[MAX_NAMESPACES];
	size_t n_exclude;
	struct text agent_namespace;
	double timeout_s;
};

/* The plugin's lines: to stderr as they are said, and to the agent with the request. */
struct plugin_log {
	const char *container_id;
	struct buf lines[4];
	size_t n;
};

__attribute__((format(printf, 2, 3))) static void say(struct plugin_log *log, const char *fmt, ...)
{
	struct buf *line = &log->lines[log->n < 4 ? log->n++ : 3];
	char small[1024];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(small, sizeof small, fmt, ap);
	va_end(ap);
	line->len = 0;
	if (n < 0)
		die_oom();
	if ((size_t)n < sizeof small) {
		buf_add(line, small, (size_t)n);
	} else {
		char *big = malloc((size_t)n + 1);
		if (!big)
			die_oom();
		va_start(ap, fmt);
		vsnprintf(big, (size_t)n + 1, fmt, ap);
		va_end(ap);
		buf_add(line, big, (size_t)n);
		free(big);
	}
	/* main.py: the first 12 characters of the container id. */
	const char *id = log->container_id;
	size_t chars = 0, bytes = 0;
	while (id[bytes] && chars < 12) {
		bytes++;
		while ((id[bytes] & 0xc0) == 0x80)
			bytes++;
		chars++;
	}
	if (bytes)
		fprintf(stderr, "weir-cni[%.*s]: %s\n", (int)bytes, id, line->data);
	else
		fprintf(stderr, "weir-cni: %s\n", line->data);
}

static bool text_eq(struct text a, struct text b)
{
	return a.n == b.n && memcmp(a.s, b.s, a.n) == 0;
}

/* The CNI_* variables; false when main.py would refuse them (or they are not UTF-8). */
static bool read_env(const char *command, struct pod *pod)
{
	pod->container_id = getenv("CNI_CONTAINERID");
	pod->netns = getenv("CNI_NETNS");
	pod->ifname = getenv("CNI_IFNAME");
	const char *args = getenv("CNI_ARGS");
	const char **vars[] = {&pod->container_id, &pod->netns, &pod->ifname, &args};
	for (size_t i = 0; i < 4; i++) {
		if (!*vars[i])
			*vars[i] = "";
		if (!valid_utf8(*vars[i], strlen(*vars[i])))
			return false;
	}
	if (strcmp(command, "ADD") == 0 && !(*pod->container_id && *pod->netns && *pod->ifname))
		return false;
	pod->namespace = pod->name = pod->uid = (struct text){"", 0};
	/* K1=V1;K2=V2, later keys win; a pair without `=` or key is an error. */
	for (const char *p = args; *p;) {
		const char *semi = strchr(p, ';');
		size_t len = semi ? (size_t)(semi - p) : strlen(p);
		if (len) {
			const char *eq = memchr(p, '=', len);
			if (!eq || eq == p)
				return false;
			struct text key = {p, (size_t)(eq - p)}, value = {eq + 1, len - key.n - 1};
			if (text_eq(key, (struct text){"K8S_POD_NAMESPACE", 17}))
				pod->namespace = value;
			else if (text_eq(key, (struct text){"K8S_POD_NAME", 12}))
				pod->name = value;
			else if (text_eq(key, (struct text){"K8S_POD_UID", 11}))
				pod->uid = value;
		}
		p += len + (semi ? 1 : 0);
	}
	return true;
}

static bool supported_version(const char *s, size_t n, const char **version)
{
	for (size_t i = 0; i < N_SUPPORTED; i++) {
		if (strlen(SUPPORTED_VERSIONS[i]) == n && memcmp(SUPPORTED_VERSIONS[i], s, n) == 0) {
			*version = SUPPORTED_VERSIONS[i];
			return true;
		}
	}
	return false;
}

/* A non-empty string without escapes, as a value this program can use as it is. */
static bool usable_string(const struct jval *v, struct text *out)
{
	return plain_string(v, &out->s, &out->n) && out->n > 0;
}

/* The network config on stdin; false when main.py's read_config would refuse it. */
static bool read_config(const char *raw, size_t n, struct config *cfg)
{
	struct jval doc, v;
	bool escaped = false;
	struct text t;
	if (n > MAX_STDIN || !parse_document(raw, n, &doc) || doc.type != J_OBJECT)
		return false;

	if (!member(&doc, "cniVersion", &v, &escaped) || !usable_string(&v, &t) ||
	    !supported_version(t.s, t.n, &cfg->version))
		return false;

	cfg->has_prev_result = member(&doc, "prevResult", &cfg->prev_result, &escaped) &&
			       cfg->prev_result.type != J_NULL;
	if (cfg->has_prev_result && cfg->prev_result.type != J_OBJECT)
		return false;

	t = (struct text){DEFAULT_AGENT_SOCKET, strlen(DEFAULT_AGENT_SOCKET)};
	if (member(&doc, "agentSocket", &v, &escaped) && !usable_string(&v, &t))
		return false;
	if (t.n >= sizeof cfg->socket_path) /* Python cannot connect to it either */
		return false;
	memcpy(cfg->socket_path, t.s, t.n);
	cfg->socket_path[t.n] = '\0';

	cfg->n_exclude = 0;
	if (member(&doc, "excludeNamespaces", &v, &escaped)) {
		const char *it = NULL;
		struct jval k, ns;
		if (v.type != J_ARRAY)
			return false;
		while (next_item(&v, &it, &k, &ns))
			if (cfg->n_exclude == MAX_NAMESPACES ||
			    !usable_string(&ns, &cfg->exclude[cfg->n_exclude++]))
				return false;
	} else {
		cfg->exclude[cfg->n_exclude++] =
		    (struct text){DEFAULT_EXCLUDE_NAMESPACE, strlen(DEFAULT_EXCLUDE_NAMESPACE)};
	}

	cfg->agent_namespace =
	    (struct text){DEFAULT_AGENT_NAMESPACE, strlen(DEFAULT_AGENT_NAMESPACE)};
	if (member(&doc, "agentNamespace", &v, &escaped) && !usable_string(&v, &cfg->agent_namespace))
		return false;

	cfg->timeout_s = DEFAULT_AGENT_TIMEOUT_S;
	if (member(&doc, "agentTimeoutSeconds", &v, &escaped)) {
		if (v.type != J_NUMBER)
			return false;
		char number[64];
		size_t len = (size_t)(v.end - v.start);
		if (len >= sizeof number)
			return false;
		memcpy(number, v.start, len);
		number[len] = '\0';
		cfg->timeout_s = strtod(number, NULL);
		if (!(cfg->timeout_s > 0 && cfg->timeout_s <= MAX_AGENT_TIMEOUT_S))
			return false;
	}
	/* A key spelled with escapes may be one of ours: only Python can tell. */
	return !escaped;
}

/* main.py's pod_ips: the `ips[].address` of prevResult. */
static bool read_ips(const struct config *cfg, struct pod *pod)
{
	struct jval ips, entry, address, k;
	bool escaped = false;
	const char *it = NULL;
	pod->n_ips = 0;
	if (!cfg->has_prev_result || !member(&cfg->prev_result, "ips", &ips, &escaped) ||
	    ips.type != J_ARRAY)
		return false;
	while (next_item(&ips, &it, &k, &entry)) {
		struct text *ip = &pod->ips[pod->n_ips];
		if (pod->n_ips == MAX_IPS || entry.type != J_OBJECT ||
		    !member(&entry, "address", &address, &escaped) || !usable_string(&address, ip) ||
		    !memchr(ip->s, '/', ip->n))
			return false;
		pod->n_ips++;
	}
	return pod->n_ips > 0 && !escaped;
}

static void describe(const struct pod *pod, struct buf *out)
{
	out->len = 0;
	if (pod->namespace.n && pod->name.n)
		buf_fmt(out, "%.*s/%.*s", (int)pod->namespace.n, pod->namespace.s, (int)pod->name.n,
			pod->name.s);
	else
		buf_fmt(out, "container %s", pod->container_id);
}

/* -- the agent socket (cni_plugin/agent_client.py, protocol.py) ----------------- */

enum outcome { REPLIED, UNREACHABLE, NONSENSE };

struct exchange {
	int fd;
	double deadline, timeout_s;
	enum outcome outcome;
	struct buf problem; /* UNREACHABLE, NONSENSE: what went wrong */
	bool ok, captured, retryable;
	struct buf reason, error;
};

static double monotonic(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Connect without blocking; false (nothing sent) when the agent does not take it now. */
static bool agent_connect(struct exchange *x, const char *path, double timeout_s)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	x->timeout_s = timeout_s;
	x->deadline = monotonic() + timeout_s;
	strcpy(addr.sun_path, path);
	x->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (x->fd < 0)
		return false;
	if (connect(x->fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
		close(x->fd);
		return false;
	}
	return true;
}

/* Wait until `events` on the socket; false (UNREACHABLE recorded) at the deadline. */
static bool agent_wait(struct exchange *x, short events)
{
	for (;;) {
		double left = x->deadline - monotonic();
		if (left <= 0)
			break;
		struct pollfd pfd = {.fd = x->fd, .events = events};
		int ms = (int)(left * 1000) + 1;
		int n = poll(&pfd, 1, ms);
		if (n > 0)
			return true;
		if (n < 0 && errno != EINTR) {
			x->outcome = UNREACHABLE;
			buf_str(&x->problem, strerror(errno));
			return false;
		}
	}
	x->outcome = UNREACHABLE;
	buf_fmt(&x->problem, "no answer within %g s", x->timeout_s);
	return false;
}

static bool agent_send(struct exchange *x, const struct buf *frame)
{
	for (size_t sent = 0; sent < frame->len;) {
		if (!agent_wait(x, POLLOUT))
			return false;
		ssize_t n = send(x->fd, frame->data + sent, frame->len - sent, MSG_NOSIGNAL);
		/* The agent answers some requests without reading them (busy, a refused
		 * uid) and closes: that answer is still there to read, as agent_client.py. */
		if (n < 0 && (errno == EPIPE || errno == ECONNRESET))
			return true;
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			x->outcome = UNREACHABLE;
			buf_str(&x->problem, strerror(errno));
			return false;
		}
		if (n > 0)
			sent += (size_t)n;
	}
	return true;
}

static bool agent_recv(struct exchange *x, char *into, size_t size)
{
	for (size_t got = 0; got < size;) {
		if (!agent_wait(x, POLLIN))
			return false;
		ssize_t n = recv(x->fd, into + got, size - got, 0);
		if (n == 0) {
			/* An agent dying mid-request: retryable, as protocol.ConnectionClosedError. */
			x->outcome = UNREACHABLE;
			buf_fmt(&x->problem, "connection closed after %zu of %zu bytes", got, size);
			return false;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			x->outcome = UNREACHABLE;
			buf_str(&x->problem, strerror(errno));
			return false;
		}
		if (n > 0)
			got += (size_t)n;
	}
	return true;
}

static bool nonsense(struct exchange *x, const char *problem)
{
	x->outcome = NONSENSE;
	buf_str(&x->problem, problem);
	return false;
}

/* protocol.decode_reply */
static bool decode_reply(struct exchange *x, const char *payload, size_t n)
{
	struct jval body, v, ok, a, b;
	bool escaped = false;
	if (!parse_document(payload, n, &body))
		return nonsense(x, "message is not UTF-8 JSON");
	if (body.type != J_OBJECT)
		return nonsense(x, "message is not a JSON object");
	if (!member(&body, "v", &v, &escaped)) {
		return nonsense(x, "protocol version None is not supported (this side speaks "
				   PROTOCOL_VERSION ")");
	}
	if (!jval_is(&v, PROTOCOL_VERSION)) {
		nonsense(x, "");
		buf_fmt(&x->problem, "protocol version %.*s is not supported (this side speaks %s)",
			(int)(v.end - v.start), v.start, PROTOCOL_VERSION);
		return false;
	}
	if (!member(&body, "ok", &ok, &escaped) || (ok.type != J_TRUE && ok.type != J_FALSE))
		return nonsense(x, "reply has no boolean 'ok'");
	x->ok = ok.type == J_TRUE;
	if (x->ok) {
		bool has_a = member(&body, "captured", &a, &escaped);
		bool has_b = member(&body, "reason", &b, &escaped);
		if ((has_a && a.type != J_TRUE && a.type != J_FALSE) ||
		    (has_b && (b.type != J_STRING || !decode_string(&b, &x->reason))))
			return nonsense(x, "a success reply needs a boolean captured and a string reason");
		x->captured = has_a && a.type == J_TRUE;
		buf_add(&x->reason, "", 0);
	} else if (!member(&body, "error", &a, &escaped) || a.type != J_STRING ||
		   !decode_string(&a, &x->error) || !member(&body, "retryable", &b, &escaped) ||
		   (b.type != J_TRUE && b.type != J_FALSE)) {
		return nonsense(x, "a failure reply needs a string error and a boolean retryable");
	} else {
		x->retryable = b.type == J_TRUE;
	}
	x->outcome = REPLIED;
	return true;
}

/* protocol.encode_request for one pod; then the exchange to its end. */
static void agent_ask(struct exchange *x, const char *op, const struct pod *pod,
		      const struct plugin_log *log)
{
	struct buf frame = {0};
	buf_add(&frame, "\0\0\0\0", 4); /* the length, once known */
	buf_fmt(&frame, "{\"v\":" PROTOCOL_VERSION ",\"op\":\"%s\",\"pod\":{\"container_id\":", op);
	buf_json_str(&frame, pod->container_id);
	buf_str(&frame, ",\"netns\":");
	buf_json_str(&frame, pod->netns);
	buf_str(&frame, ",\"ifname\":");
	buf_json_str(&frame, pod->ifname);
	buf_str(&frame, ",\"ips\":[");
	for (size_t i = 0; i < pod->n_ips; i++) {
		if (i)
			buf_str(&frame, ",");
		buf_json(&frame, pod->ips[i].s, pod->ips[i].n);
	}
	buf_str(&frame, "],\"namespace\":");
	buf_json(&frame, pod->namespace.s, pod->namespace.n);
	buf_str(&frame, ",\"name\":");
	buf_json(&frame, pod->name.s, pod->name.n);
	buf_str(&frame, ",\"uid\":");
	buf_json(&frame, pod->uid.s, pod->uid.n);
	buf_str(&frame, "}");
	if (log->n) {
		buf_str(&frame, ",\"plugin_log\":[");
		for (size_t i = 0; i < log->n; i++) {
			if (i)
				buf_str(&frame, ",");
			buf_json(&frame, log->lines[i].data, log->lines[i].len);
		}
		buf_str(&frame, "]");
	}
	buf_str(&frame, "}");
	uint32_t size = (uint32_t)(frame.len - 4);
	unsigned char header[4] = {size >> 24, (size >> 16) & 0xff, (size >> 8) & 0xff, size & 0xff};
	memcpy(frame.data, header, 4);

	unsigned char got[4];
	if (agent_send(x, &frame) && agent_recv(x, (char *)got, 4)) {
		size = (uint32_t)got[0] << 24 | (uint32_t)got[1] << 16 | (uint32_t)got[2] << 8 | got[3];
		if (size == 0 || size > MAX_FRAME) {
			nonsense(x, "");
			buf_fmt(&x->problem, "frame length %u is outside 1..%d", size, MAX_FRAME);
		} else {
			char *payload = malloc(size);
			if (!payload)
				die_oom();
			if (agent_recv(x, payload, size))
				decode_reply(x, payload, size);
			free(payload);
		}
	}
	free(frame.data);
	close(x->fd);
}

/* main.py's _ask: what a failed exchange is, as a CNI error message. */
static void exchange_failure(const struct exchange *x, const struct config *cfg, struct buf *msg)
{
	if (x->outcome == UNREACHABLE)
		buf_fmt(msg, "weir node agent unreachable at %s: %s", cfg->socket_path, x->problem.data);
	else
		buf_fmt(msg, "weir node agent answered nonsense: %s", x->problem.data);
}

/* -- the commands (main.py) ------------------------------------------------------- */

static int cni_error(struct plugin_log *log, const char *version, int code, const struct buf *msg)
{
	struct buf out = {0};
	say(log, "error %d: %s", code, msg->data);
	buf_fmt(&out, "{\"cniVersion\": \"%s\", \"code\": %d, \"msg\": ", version, code);
	buf_json(&out, msg->data, msg->len);
	buf_str(&out, "}");
	fwrite(out.data, 1, out.len, stdout);
	return 1;
}

static int cmd_version(const char *raw, size_t n)
{
	struct jval doc, v;
	bool escaped = false;
	const char *version = LATEST_VERSION;
	/* main.py: the requested version when we speak it; not JSON at all means the latest. */
	if (!parse_document(raw, n, &doc))
		return FALLBACK; /* Python's json takes a little more (NaN, Infinity) */
	if (doc.type == J_OBJECT && member(&doc, "cniVersion", &v, &escaped) && v.type == J_STRING) {
		const char *s;
		size_t len;
		if (!plain_string(&v, &s, &len))
			return FALLBACK;
		supported_version(s, len, &version);
	}
	if (escaped)
		return FALLBACK;
	printf("{\"cniVersion\": \"%s\", \"supportedVersions\": [", version);
	for (size_t i = 0; i < N_SUPPORTED; i++)
		printf("%s\"%s\"", i ? ", " : "", SUPPORTED_VERSIONS[i]);
	printf("]}");
	return 0;
}

/* main.py's _excluded */
static bool excluded(const struct pod *pod, const struct config *cfg, struct buf *why)
{
	why->len = 0;
	if (pod->namespace.n && text_eq(pod->namespace, cfg->agent_namespace)) {
		buf_fmt(why, "namespace %.*s is the node agent's own", (int)pod->namespace.n,
			pod->namespace.s);
		return true;
	}
	for (size_t i = 0; i < cfg->n_exclude; i++) {
		if (text_eq(pod->namespace, cfg->exclude[i])) {
			buf_fmt(why, "namespace %.*s is excluded in the plugin config",
				(int)pod->namespace.n, pod->namespace.s);
			return true;
		}
	}
	return false;
}

static void join_ips(const struct pod *pod, struct buf *out)
{
	for (size_t i = 0; i < pod->n_ips; i++)
		buf_fmt(out, "%s%.*s", i ? "," : "", (int)pod->ips[i].n, pod->ips[i].s);
	buf_add(out, "", 0);
}

static int cmd_add(const char *raw, size_t n, struct plugin_log *log)
{
	struct pod pod;
	struct config cfg;
	struct buf who = {0}, why = {0}, ips = {0}, msg = {0};
	struct exchange x = {0};
	if (!read_env("ADD", &pod) || !read_config(raw, n, &cfg) || !read_ips(&cfg, &pod))
		return FALLBACK;
	log->container_id = pod.container_id;
	describe(&pod, &who);
	join_ips(&pod, &ips);
	if (excluded(&pod, &cfg, &why)) {
		say(log, "ADD %s netns %s ips %s", who.data, pod.netns, ips.data);
		say(log, "%s not captured: %s", who.data, why.data);
	} else {
		if (!agent_connect(&x, cfg.socket_path, cfg.timeout_s))
			return FALLBACK;
		say(log, "ADD %s netns %s ips %s", who.data, pod.netns, ips.data);
		agent_ask(&x, "add", &pod, log);
		if (x.outcome != REPLIED) {
			exchange_failure(&x, &cfg, &msg);
			if (x.outcome == UNREACHABLE)
				buf_fmt(&msg, "; %s is not started uncaptured, the runtime will retry",
					who.data);
			return cni_error(log, cfg.version,
					 x.outcome == UNREACHABLE ? ERR_TRY_AGAIN_LATER
								  : ERR_AGENT_PROTOCOL,
					 &msg);
		}
		if (!x.ok) {
			buf_fmt(&msg, "weir node agent could not capture %s: %s", who.data,
				x.error.data);
			return cni_error(log, cfg.version,
					 x.retryable ? ERR_TRY_AGAIN_LATER : ERR_CAPTURE_REFUSED, &msg);
		}
		if (!x.captured)
			say(log, "%s not captured: %s", who.data,
			    x.reason.len ? x.reason.data : "the agent said so");
	}
	fwrite(cfg.prev_result.start, 1, (size_t)(cfg.prev_result.end - cfg.prev_result.start),
	       stdout);
	return 0;
}

static int cmd_del(const char *raw, size_t n, struct plugin_log *log)
{
	struct pod pod;
	struct config cfg;
	struct buf who = {0}, msg = {0};
	struct exchange x = {0};
	if (!read_env("DEL", &pod))
		return FALLBACK;
	log->container_id = pod.container_id;
	if (!*pod.container_id) {
		say(log, "DEL without CNI_CONTAINERID: nothing to tell the agent");
		return 0;
	}
	if (!read_config(raw, n, &cfg))
		return FALLBACK;
	pod.n_ips = 0;
	if (cfg.has_prev_result && !read_ips(&cfg, &pod))
		return FALLBACK;
	describe(&pod, &who);
	double timeout_s = cfg.timeout_s < SHORT_TIMEOUT_S ? cfg.timeout_s : SHORT_TIMEOUT_S;
	if (!agent_connect(&x, cfg.socket_path, timeout_s))
		return FALLBACK;
	agent_ask(&x, "del", &pod, log);
	if (x.outcome != REPLIED) {
		exchange_failure(&x, &cfg, &msg);
		say(log, "DEL of %s not delivered (%s); the agent reconciles it later", who.data,
		    msg.data);
	} else if (!x.ok) {
		say(log, "agent failed DEL of %s: %s", who.data, x.error.data);
	}
	return 0;
}

/* -- the Python plugin ------------------------------------------------------------ */

/* Exec weir-cni-py with the stdin this program read; returns only if that failed. */
static int run_python(char **argv, const char *raw, size_t n)
{
	char self[PATH_MAX];
	struct buf msg = {0};
	struct plugin_log log = {.container_id = ""};
	ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
	if (len > 0) {
		self[len] = '\0';
		char *slash = strrchr(self, '/');
		if (slash && (size_t)(slash - self) + sizeof "/" FALLBACK_NAME <= sizeof self) {
			strcpy(slash + 1, FALLBACK_NAME);
			int fd = memfd_create("weir-cni-stdin", MFD_CLOEXEC);
			bool written = fd >= 0;
			for (size_t off = 0; written && off < n;) {
				ssize_t w = write(fd, raw + off, n - off);
				written = w > 0;
				off += written ? (size_t)w : 0;
			}
			if (written && lseek(fd, 0, SEEK_SET) == 0 && dup2(fd, STDIN_FILENO) == 0) {
				fflush(stdout);
				fflush(stderr);
				argv[0] = self;
				execv(self, argv);
			}
		}
	}
	buf_fmt(&msg, "weir-cni internal error: cannot run %s: %s",
		len > 0 ? self : FALLBACK_NAME, strerror(errno));
	return cni_error(&log, LATEST_VERSION, ERR_INTERNAL, &msg);
}

static bool read_stdin(struct buf *in)
{
	/* main.py reads at most MAX_STDIN + 1 bytes: one more says "too large". */
	char chunk[65536];
	while (in->len <= MAX_STDIN) {
		size_t want = MAX_STDIN + 1 - in->len;
		ssize_t n = read(STDIN_FILENO, chunk, want < sizeof chunk ? want : sizeof chunk);
		if (n == 0)
			break;
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return false;
		}
		buf_add(in, chunk, (size_t)n);
	}
	buf_add(in, "", 0);
	return true;
}

int main(int argc, char **argv)
{
	struct buf in = {0};
	struct plugin_log log = {.container_id = ""};
	const char *command = getenv("CNI_COMMAND");
	int status = FALLBACK;
	(void)argc;
	if (!read_stdin(&in))
		return run_python(argv, in.data, in.len);
	if (command && strcmp(command, "VERSION") == 0)
		status = cmd_version(in.data, in.len);
	else if (command && strcmp(command, "ADD") == 0)
		status = cmd_add(in.data, in.len, &log);
	else if (command && strcmp(command, "DEL") == 0)
		status = cmd_del(in.data, in.len, &log);
	if (status == FALLBACK)
		return run_python(argv, in.data, in.len);
	return fflush(stdout) == 0 ? status : 1;
}
