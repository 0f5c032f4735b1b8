/*
 * verbs semantics through the shim, checked from C as an application sees them (the inline
 * functions of verbs.h included): errno conventions, completion channels (poll, EAGAIN,
 * EINTR), asynchronous events, EBUSY on destroy, bad_wr, address handles from a UD
 * completion, shared receive queues (receives taken in order, the limit event, EBUSY). Needs two devices (VRDMA_SOCKETS=vm1:vm2). Prints "verbs_semantics: ok".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <infiniband/verbs.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

#define CHECK(cond, ...)                                                        \
	do {                                                                    \
		if (!(cond)) {                                                  \
			fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__,  \
				__LINE__, #cond);                               \
			fprintf(stderr, __VA_ARGS__);                           \
			fprintf(stderr, " (errno %d)\n", errno);                \
			exit(1);                                                \
		}                                                               \
	} while (0)

struct side {
	struct ibv_context *ctx;
	struct ibv_pd *pd;
	struct ibv_comp_channel *ch;
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	struct ibv_mr *mr;
	char *buf;
	uint16_t lid;
};

static int marker;

static void open_side(struct ibv_device *dev, struct side *s, enum ibv_qp_type type)
{
	struct ibv_port_attr port;
	struct ibv_qp_init_attr init = {
		.cap = { .max_send_wr = 8, .max_recv_wr = 8, .max_send_sge = 1, .max_recv_sge = 1 },
		.qp_type = type,
	};

	s->ctx = ibv_open_device(dev);
	CHECK(s->ctx, "ibv_open_device");
	CHECK(ibv_query_port(s->ctx, 1, &port) == 0, "ibv_query_port");
	CHECK(port.state == IBV_PORT_ACTIVE && port.link_layer == IBV_LINK_LAYER_INFINIBAND,
	      "port state %d link layer %d", port.state, port.link_layer);
	s->lid = port.lid;
	s->pd = ibv_alloc_pd(s->ctx);
	CHECK(s->pd, "ibv_alloc_pd");
	s->ch = ibv_create_comp_channel(s->ctx);
	CHECK(s->ch, "ibv_create_comp_channel");
	s->cq = ibv_create_cq(s->ctx, 16, &marker, s->ch, 0);
	CHECK(s->cq, "ibv_create_cq");
	CHECK(posix_memalign((void **)&s->buf, 4096, 8192) == 0, "posix_memalign");
	memset(s->buf, 0, 8192);
	s->mr = ibv_reg_mr(s->pd, s->buf, 8192,
			   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
			   IBV_ACCESS_REMOTE_READ | IBV_ACCESS_RELAXED_ORDERING);
	CHECK(s->mr, "ibv_reg_mr with the optional relaxed-ordering bit");
	init.send_cq = s->cq;
	init.recv_cq = s->cq;
	s->qp = ibv_create_qp(s->pd, &init);
	CHECK(s->qp, "ibv_create_qp");
	CHECK(init.cap.max_send_wr >= 8, "actual caps written back");
}

static void to_rts(struct side *s, const struct side *peer)
{
	struct ibv_qp_attr a = {
		.qp_state = IBV_QPS_INIT, .port_num = 1,
		.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE |
				   IBV_ACCESS_REMOTE_READ,
	};
	CHECK(ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
					   IBV_QP_ACCESS_FLAGS) == 0, "INIT");
	memset(&a, 0, sizeof a);
	a.qp_state = IBV_QPS_RTR;
	a.path_mtu = IBV_MTU_1024;
	a.dest_qp_num = peer->qp->qp_num;
	a.max_dest_rd_atomic = 1;
	a.min_rnr_timer = 12;
	a.ah_attr.dlid = peer->lid;
	a.ah_attr.port_num = 1;
	CHECK(ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU |
					   IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
					   IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) == 0, "RTR");
	a.qp_state = IBV_QPS_RTS;
	a.timeout = 14;
	a.retry_cnt = 7;
	a.rnr_retry = 7;
	a.max_rd_atomic = 1;
	CHECK(ibv_modify_qp(s->qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
					   IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
					   IBV_QP_MAX_QP_RD_ATOMIC) == 0, "RTS");
}

static struct ibv_wc poll_one(struct ibv_cq *cq)
{
	struct ibv_wc wc;
	int n;

	do {
		n = ibv_poll_cq(cq, 1, &wc);
	} while (n == 0);
	CHECK(n == 1, "ibv_poll_cq returned %d", n);
	return wc;
}

static void on_alarm(int sig)
{
	(void)sig;
}

static void check_errnos(struct ibv_device **list)
{
	struct ibv_context *ctx = ibv_open_device(list[0]);
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_qp_init_attr init = {
		.cap = { .max_send_wr = 1, .max_recv_wr = 1, .max_send_sge = 1, .max_recv_sge = 1 },
		.qp_type = IBV_QPT_UC,
	};
	char *ro;

	CHECK(ctx, "ibv_open_device");
	pd = ibv_alloc_pd(ctx);
	CHECK(pd, "ibv_alloc_pd");
	cq = ibv_create_cq(ctx, 4, NULL, NULL, 0);
	CHECK(cq, "ibv_create_cq");
	errno = 0;
	CHECK(!ibv_create_cq(ctx, 0, NULL, NULL, 0) && errno == EINVAL, "cqe 0");
	init.send_cq = cq;
	init.recv_cq = cq;
	errno = 0;
	CHECK(!ibv_create_qp(pd, &init) && errno == EOPNOTSUPP, "UC QP");
	errno = 0;
	CHECK(!ibv_reg_mr(pd, &marker, 0, IBV_ACCESS_LOCAL_WRITE) && errno == EINVAL, "length 0");
	errno = 0;
	CHECK(!ibv_reg_mr(pd, &marker, sizeof marker, IBV_ACCESS_MW_BIND) && errno == EINVAL,
	      "memory-window access");
	ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(ro != MAP_FAILED, "mmap");
	errno = 0;
	CHECK(!ibv_reg_mr(pd, ro, 4096, IBV_ACCESS_LOCAL_WRITE) && errno == EFAULT,
	      "read-only memory for writing");
	{
		struct ibv_mr *mr = ibv_reg_mr(pd, ro, 4096, 0);
		CHECK(mr, "read-only memory for reading");
		CHECK(ibv_dereg_mr(mr) == 0, "ibv_dereg_mr");
	}
	errno = 0;
	CHECK(!ibv_alloc_mw(pd, IBV_MW_TYPE_1) && errno == EOPNOTSUPP, "ibv_alloc_mw");
	CHECK(ibv_destroy_cq(cq) == 0, "ibv_destroy_cq");
	CHECK(ibv_dealloc_pd(pd) == 0, "ibv_dealloc_pd");
	CHECK(ibv_close_device(ctx) == 0, "ibv_close_device");
}

static void check_rc(struct ibv_device **list)
{
	struct side a, b;
	struct ibv_cq *ev_cq;
	void *ev_ctx;
	struct ibv_qp_attr qa;
	struct ibv_qp_init_attr qi;
	struct ibv_async_event ae;
	struct pollfd pfd;
	struct sigaction sa;
	struct itimerval it = { .it_value = { .tv_usec = 50000 } };
	int flags, i;

	open_side(list[0], &a, IBV_QPT_RC);
	open_side(list[1], &b, IBV_QPT_RC);
	{
		struct ibv_qp_attr bad = { .qp_state = IBV_QPS_RTS };
		CHECK(ibv_modify_qp(a.qp, &bad, IBV_QP_STATE) == EINVAL, "RESET to RTS");
	}
	to_rts(&a, &b);
	to_rts(&b, &a);
	CHECK(ibv_query_qp(a.qp, &qa, IBV_QP_STATE | IBV_QP_DEST_QPN, &qi) == 0, "ibv_query_qp");
	CHECK(qa.qp_state == IBV_QPS_RTS && qa.dest_qp_num == b.qp->qp_num &&
	      qi.send_cq == a.cq && a.qp->state == IBV_QPS_RTS, "queried attributes");

	/* A completion wakes a poll() of the channel fd, and ibv_get_cq_event names its CQ. */
	CHECK(ibv_req_notify_cq(b.cq, 0) == 0, "ibv_req_notify_cq");
	{
		struct ibv_sge rs = { (uintptr_t)b.buf, 64, b.mr->lkey };
		struct ibv_recv_wr rwr = { .wr_id = 7, .sg_list = &rs, .num_sge = 1 }, *rbad;
		struct ibv_sge ss = { (uintptr_t)a.buf, 64, a.mr->lkey };
		struct ibv_send_wr swr = { .wr_id = 8, .sg_list = &ss, .num_sge = 1,
					   .opcode = IBV_WR_SEND_WITH_IMM,
					   .send_flags = IBV_SEND_SIGNALED,
					   .imm_data = htonl(0x11223344) }, *sbad;
		memset(a.buf, 0x42, 64);
		CHECK(ibv_post_recv(b.qp, &rwr, &rbad) == 0, "ibv_post_recv");
		CHECK(ibv_post_send(a.qp, &swr, &sbad) == 0, "ibv_post_send");
	}
	pfd.fd = b.ch->fd;
	pfd.events = POLLIN;
	CHECK(poll(&pfd, 1, 10000) == 1, "poll on the channel fd");
	CHECK(ibv_get_cq_event(b.ch, &ev_cq, &ev_ctx) == 0, "ibv_get_cq_event");
	CHECK(ev_cq == b.cq && ev_ctx == &marker, "the event names the CQ and its context");
	ibv_ack_cq_events(ev_cq, 1);
	{
		struct ibv_wc wc = poll_one(b.cq);
		CHECK(wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_RECV && wc.wr_id == 7 &&
		      wc.byte_len == 64 && (wc.wc_flags & IBV_WC_WITH_IMM) &&
		      ntohl(wc.imm_data) == 0x11223344 && b.buf[63] == 0x42,
		      "receive completion: status %d opcode %d", wc.status, wc.opcode);
		wc = poll_one(a.cq);
		CHECK(wc.status == IBV_WC_SUCCESS && wc.wr_id == 8, "send completion");
	}

	/* A non-blocking channel: EAGAIN when nothing is queued. */
	flags = fcntl(b.ch->fd, F_GETFL);
	CHECK(fcntl(b.ch->fd, F_SETFL, flags | O_NONBLOCK) == 0, "fcntl");
	errno = 0;
	CHECK(ibv_get_cq_event(b.ch, &ev_cq, &ev_ctx) == -1 && errno == EAGAIN, "EAGAIN");
	CHECK(fcntl(b.ch->fd, F_SETFL, flags) == 0, "fcntl");

	/* A signal interrupts a blocking wait: -1 with EINTR (qperf ends its tests so). */
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	CHECK(sigaction(SIGALRM, &sa, NULL) == 0, "sigaction");
	CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0, "setitimer");
	errno = 0;
	CHECK(ibv_get_cq_event(b.ch, &ev_cq, &ev_ctx) == -1 && errno == EINTR, "EINTR");

	/* Objects in use are busy. */
	CHECK(ibv_destroy_cq(a.cq) == EBUSY, "CQ with a QP");
	CHECK(ibv_dealloc_pd(a.pd) == EBUSY, "PD with a QP and an MR");
	CHECK(ibv_destroy_comp_channel(a.ch) == EBUSY, "channel with a CQ");

	/* bad_wr is the first request not posted; the ones before it are. */
	{
		struct ibv_sge ss = { (uintptr_t)a.buf, 8, a.mr->lkey };
		struct ibv_send_wr second = { .wr_id = 21, .sg_list = &ss, .num_sge = 1,
					      .opcode = 99 };
		struct ibv_send_wr first = { .wr_id = 20, .next = &second, .sg_list = &ss,
					     .num_sge = 1, .opcode = IBV_WR_RDMA_WRITE,
					     .send_flags = IBV_SEND_SIGNALED,
					     .wr.rdma = { (uintptr_t)b.buf, b.mr->rkey } };
		struct ibv_send_wr *bad = NULL;
		CHECK(ibv_post_send(a.qp, &first, &bad) == EINVAL && bad == &second, "bad_wr");
		CHECK(poll_one(a.cq).wr_id == 20, "the request before bad_wr was posted");
	}

	/* Overrunning a CQ raises IBV_EVENT_CQ_ERR on the async fd. */
	{
		struct ibv_cq *tiny = ibv_create_cq(a.ctx, 1, NULL, NULL, 0);
		struct ibv_qp_init_attr init = {
			.send_cq = tiny, .recv_cq = tiny,
			.cap = { .max_send_wr = 8, .max_recv_wr = 1, .max_send_sge = 1,
				 .max_recv_sge = 1 },
			.qp_type = IBV_QPT_RC,
		};
		struct ibv_qp *qp;
		struct side c = a;
		CHECK(tiny && tiny->cqe >= 1, "tiny CQ");
		qp = ibv_create_qp(a.pd, &init);
		CHECK(qp, "QP on the tiny CQ");
		c.qp = qp;
		to_rts(&c, &b);
		for (i = 0; i < 4; i++) {
			struct ibv_sge ss = { (uintptr_t)a.buf, 8, a.mr->lkey };
			struct ibv_send_wr w = { .wr_id = 30 + i, .sg_list = &ss, .num_sge = 1,
						 .opcode = IBV_WR_RDMA_WRITE,
						 .send_flags = IBV_SEND_SIGNALED,
						 .wr.rdma = { (uintptr_t)b.buf, b.mr->rkey } }, *bad;
			CHECK(ibv_post_send(qp, &w, &bad) == 0, "post to the tiny CQ's QP");
		}
		pfd.fd = a.ctx->async_fd;
		pfd.events = POLLIN;
		CHECK(poll(&pfd, 1, 10000) == 1, "poll on the async fd");
		CHECK(ibv_get_async_event(a.ctx, &ae) == 0, "ibv_get_async_event");
		while (ae.event_type != IBV_EVENT_CQ_ERR) {
			ibv_ack_async_event(&ae);
			CHECK(ibv_get_async_event(a.ctx, &ae) == 0, "ibv_get_async_event");
		}
		CHECK(ae.element.cq == tiny, "CQ_ERR names the CQ (%s)",
		      ibv_event_type_str(ae.event_type));
		ibv_ack_async_event(&ae);
		CHECK(ibv_destroy_qp(qp) == 0, "destroy");
		CHECK(ibv_destroy_cq(tiny) == 0, "destroy");
	}

	CHECK(ibv_destroy_qp(a.qp) == 0 && ibv_destroy_qp(b.qp) == 0, "ibv_destroy_qp");
	CHECK(ibv_dereg_mr(a.mr) == 0 && ibv_dereg_mr(b.mr) == 0, "ibv_dereg_mr");
	CHECK(ibv_destroy_cq(a.cq) == 0 && ibv_destroy_cq(b.cq) == 0, "ibv_destroy_cq");
	CHECK(ibv_destroy_comp_channel(a.ch) == 0 && ibv_destroy_comp_channel(b.ch) == 0,
	      "ibv_destroy_comp_channel");
	CHECK(ibv_dealloc_pd(a.pd) == 0 && ibv_dealloc_pd(b.pd) == 0, "ibv_dealloc_pd");
	CHECK(ibv_close_device(a.ctx) == 0 && ibv_close_device(b.ctx) == 0, "close");
}

static void check_ud(struct ibv_device **list)
{
	struct side a, b;
	struct ibv_qp_attr at = { .qp_state = IBV_QPS_INIT, .port_num = 1, .qkey = 0x1111 };
	struct ibv_ah_attr av = { .port_num = 1 };
	struct ibv_ah *ah, *back;
	struct ibv_wc wc;
	int i;
	struct side *sides[2] = { &a, &b };

	open_side(list[0], &a, IBV_QPT_UD);
	open_side(list[1], &b, IBV_QPT_UD);
	for (i = 0; i < 2; i++) {
		struct ibv_qp *qp = sides[i]->qp;
		at.qp_state = IBV_QPS_INIT;
		CHECK(ibv_modify_qp(qp, &at, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT |
					     IBV_QP_QKEY) == 0, "UD INIT");
		at.qp_state = IBV_QPS_RTR;
		CHECK(ibv_modify_qp(qp, &at, IBV_QP_STATE) == 0, "UD RTR");
		at.qp_state = IBV_QPS_RTS;
		CHECK(ibv_modify_qp(qp, &at, IBV_QP_STATE | IBV_QP_SQ_PSN) == 0, "UD RTS");
	}
	av.dlid = b.lid;
	ah = ibv_create_ah(a.pd, &av);
	CHECK(ah, "ibv_create_ah by LID");
	av.dlid = 0;
	errno = 0;
	CHECK(!ibv_create_ah(a.pd, &av) && errno == EINVAL, "LID 0 without a GRH");
	{
		struct ibv_sge rs = { (uintptr_t)b.buf, 40 + 32, b.mr->lkey };
		struct ibv_recv_wr rwr = { .wr_id = 1, .sg_list = &rs, .num_sge = 1 }, *rbad;
		struct ibv_sge ss = { (uintptr_t)a.buf, 32, a.mr->lkey };
		struct ibv_send_wr swr = { .wr_id = 2, .sg_list = &ss, .num_sge = 1,
					   .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED,
					   .wr.ud = { ah, b.qp->qp_num, 0x1111 } }, *sbad;
		memset(a.buf, 0x33, 32);
		CHECK(ibv_post_recv(b.qp, &rwr, &rbad) == 0, "UD recv");
		CHECK(ibv_post_send(a.qp, &swr, &sbad) == 0, "UD send");
		CHECK(poll_one(a.cq).status == IBV_WC_SUCCESS, "UD send completion");
		wc = poll_one(b.cq);
		CHECK(wc.status == IBV_WC_SUCCESS && wc.src_qp == a.qp->qp_num &&
		      wc.byte_len == 40 + 32 && b.buf[40] == 0x33 && wc.slid == a.lid,
		      "UD receive: status %d src_qp %u slid %u", wc.status, wc.src_qp, wc.slid);
	}
	/* Answer the sender with an AH made from the completion and its GRH. */
	back = ibv_create_ah_from_wc(b.pd, &wc, (struct ibv_grh *)b.buf, 1);
	CHECK(back, "ibv_create_ah_from_wc");
	{
		struct ibv_sge rs = { (uintptr_t)a.buf + 4096, 40 + 16, a.mr->lkey };
		struct ibv_recv_wr rwr = { .wr_id = 3, .sg_list = &rs, .num_sge = 1 }, *rbad;
		struct ibv_sge ss = { (uintptr_t)b.buf + 4096, 16, b.mr->lkey };
		struct ibv_send_wr swr = { .wr_id = 4, .sg_list = &ss, .num_sge = 1,
					   .opcode = IBV_WR_SEND, .send_flags = IBV_SEND_SIGNALED,
					   .wr.ud = { back, wc.src_qp, 0x1111 } }, *sbad;
		memset(b.buf + 4096, 0x77, 16);
		CHECK(ibv_post_recv(a.qp, &rwr, &rbad) == 0, "UD recv");
		CHECK(ibv_post_send(b.qp, &swr, &sbad) == 0, "UD reply");
		CHECK(poll_one(b.cq).status == IBV_WC_SUCCESS, "reply completion");
		wc = poll_one(a.cq);
		CHECK(wc.status == IBV_WC_SUCCESS && a.buf[4096 + 40] == 0x77, "reply received");
	}
	CHECK(ibv_destroy_ah(ah) == 0 && ibv_destroy_ah(back) == 0, "ibv_destroy_ah");
	CHECK(ibv_destroy_qp(a.qp) == 0 && ibv_destroy_qp(b.qp) == 0, "destroy");
	CHECK(ibv_dereg_mr(a.mr) == 0 && ibv_dereg_mr(b.mr) == 0, "dereg");
	CHECK(ibv_destroy_cq(a.cq) == 0 && ibv_destroy_cq(b.cq) == 0, "destroy cq");
	CHECK(ibv_destroy_comp_channel(a.ch) == 0 && ibv_destroy_comp_channel(b.ch) == 0, "ch");
	CHECK(ibv_dealloc_pd(a.pd) == 0 && ibv_dealloc_pd(b.pd) == 0, "pd");
	CHECK(ibv_close_device(a.ctx) == 0 && ibv_close_device(b.ctx) == 0, "close");
}

static void check_srq(struct ibv_device **list)
{
	struct side a, b;
	struct ibv_device_attr da;
	struct ibv_srq_init_attr si = { .srq_context = &marker,
					.attr = { .max_wr = 8, .max_sge = 1 } };
	struct ibv_srq_attr sa;
	struct ibv_srq *srq;
	struct ibv_async_event ae;
	struct ibv_qp_init_attr init;
	int i;

	open_side(list[0], &a, IBV_QPT_RC);
	CHECK(ibv_query_device(a.ctx, &da) == 0 && da.max_srq > 0 && da.max_srq_wr >= 8,
	      "device SRQ limits %d %d", da.max_srq, da.max_srq_wr);
	srq = ibv_create_srq(a.pd, &si);
	CHECK(srq && si.attr.max_wr >= 8 && srq->srq_context == &marker, "ibv_create_srq");
	CHECK(ibv_query_srq(srq, &sa) == 0 && sa.max_wr == si.attr.max_wr && sa.srq_limit == 0,
	      "ibv_query_srq");
	sa.max_wr = 64;
	CHECK(ibv_modify_srq(srq, &sa, IBV_SRQ_MAX_WR) != 0, "resizing is refused");

	/* b's QP takes its receives from the SRQ... of its own device: make it on b. */
	ibv_destroy_qp(a.qp);
	open_side(list[1], &b, IBV_QPT_RC);
	{
		struct ibv_srq_init_attr bi = { .attr = { .max_wr = 8, .max_sge = 1 } };
		struct ibv_srq *bsrq = ibv_create_srq(b.pd, &bi);
		CHECK(bsrq, "ibv_create_srq on b");
		ibv_destroy_qp(b.qp);
		memset(&init, 0, sizeof init);
		init.send_cq = b.cq;
		init.recv_cq = b.cq;
		init.srq = bsrq;
		init.cap.max_send_wr = 8;
		init.cap.max_send_sge = 1;
		init.qp_type = IBV_QPT_RC;
		b.qp = ibv_create_qp(b.pd, &init);
		CHECK(b.qp && b.qp->srq == bsrq, "QP on an SRQ");
		memset(&init, 0, sizeof init);
		init.send_cq = a.cq;
		init.recv_cq = a.cq;
		init.cap.max_send_wr = 8;
		init.cap.max_recv_wr = 8;
		init.cap.max_send_sge = 1;
		init.cap.max_recv_sge = 1;
		init.qp_type = IBV_QPT_RC;
		a.qp = ibv_create_qp(a.pd, &init);
		CHECK(a.qp, "ibv_create_qp");
		to_rts(&a, &b);
		to_rts(&b, &a);
		CHECK(ibv_destroy_srq(bsrq) == EBUSY, "an SRQ with a QP is busy");
		{
			struct ibv_sge rs = { (uintptr_t)b.buf, 64, b.mr->lkey };
			struct ibv_recv_wr rwr = { .wr_id = 1, .sg_list = &rs, .num_sge = 1 }, *rbad;
			CHECK(ibv_post_recv(b.qp, &rwr, &rbad) != 0 && rbad == &rwr,
			      "posting to the receive queue of a QP on an SRQ fails");
			for (i = 0; i < 4; i++) {
				rs.addr = (uintptr_t)b.buf + 64 * i;
				rwr.wr_id = 100 + i;
				CHECK(ibv_post_srq_recv(bsrq, &rwr, &rbad) == 0, "ibv_post_srq_recv");
			}
		}
		sa.srq_limit = 3;
		CHECK(ibv_modify_srq(bsrq, &sa, IBV_SRQ_LIMIT) == 0, "arming the limit");
		for (i = 0; i < 2; i++) {
			struct ibv_sge ss = { (uintptr_t)a.buf, 16, a.mr->lkey };
			struct ibv_send_wr w = { .wr_id = 200 + i, .sg_list = &ss, .num_sge = 1,
						 .opcode = IBV_WR_SEND,
						 .send_flags = IBV_SEND_SIGNALED }, *bad;
			struct ibv_wc wc;
			memset(a.buf, 0x60 + i, 16);
			CHECK(ibv_post_send(a.qp, &w, &bad) == 0, "send to the SRQ's QP");
			CHECK(poll_one(a.cq).status == IBV_WC_SUCCESS, "send completion");
			wc = poll_one(b.cq);
			CHECK(wc.status == IBV_WC_SUCCESS && wc.wr_id == 100 + (uint64_t)i &&
			      wc.qp_num == b.qp->qp_num && b.buf[64 * i] == 0x60 + i,
			      "receive %d from the SRQ: wr_id %llu", i,
			      (unsigned long long)wc.wr_id);
		}
		CHECK(ibv_get_async_event(b.ctx, &ae) == 0, "ibv_get_async_event");
		CHECK(ae.event_type == IBV_EVENT_SRQ_LIMIT_REACHED && ae.element.srq == bsrq,
		      "SRQ_LIMIT_REACHED names the SRQ (got %s)", ibv_event_type_str(ae.event_type));
		ibv_ack_async_event(&ae);
		CHECK(ibv_query_srq(bsrq, &sa) == 0 && sa.srq_limit == 0, "the limit disarmed");
		CHECK(ibv_destroy_qp(b.qp) == 0, "destroy the SRQ's QP");
		CHECK(ibv_destroy_srq(bsrq) == 0, "ibv_destroy_srq");
	}
	CHECK(ibv_destroy_srq(srq) == 0, "ibv_destroy_srq");
	CHECK(ibv_destroy_qp(a.qp) == 0, "destroy");
	CHECK(ibv_dereg_mr(a.mr) == 0 && ibv_dereg_mr(b.mr) == 0, "dereg");
	CHECK(ibv_destroy_cq(a.cq) == 0 && ibv_destroy_cq(b.cq) == 0, "destroy cq");
	CHECK(ibv_destroy_comp_channel(a.ch) == 0 && ibv_destroy_comp_channel(b.ch) == 0, "ch");
	CHECK(ibv_dealloc_pd(a.pd) == 0 && ibv_dealloc_pd(b.pd) == 0, "pd");
	CHECK(ibv_close_device(a.ctx) == 0 && ibv_close_device(b.ctx) == 0, "close");
}

/* Closing a device frees what the program left (as the kernel does), so the VM's next
 * guest connects: qperf deallocates its PD before deregistering its MR, and reopens the
 * device for its next test. */
static void check_close_frees_leftovers(struct ibv_device **list)
{
	struct side a;
	struct ibv_context *again;
	struct ibv_pd *pd;

	open_side(list[0], &a, IBV_QPT_RC);
	CHECK(ibv_dealloc_pd(a.pd) == EBUSY, "a PD with objects is busy");
	CHECK(ibv_close_device(a.ctx) == 0, "close with objects left");
	again = ibv_open_device(list[0]);
	CHECK(again, "reopening after a close with objects left");
	pd = ibv_alloc_pd(again);
	CHECK(pd, "ibv_alloc_pd after reopening");
	CHECK(ibv_dealloc_pd(pd) == 0 && ibv_close_device(again) == 0, "close");
}

int main(void)
{
	struct ibv_device **list;
	int num;

	list = ibv_get_device_list(&num);
	CHECK(list && num == 2, "two devices");
	CHECK(!strcmp(ibv_get_device_name(list[0]), "vrdma0") &&
	      !strcmp(ibv_get_device_name(list[1]), "vrdma1"), "names");
	CHECK(ibv_get_device_guid(list[0]) && ibv_get_device_guid(list[0]) !=
	      ibv_get_device_guid(list[1]), "GUIDs");
	CHECK(!strcmp(ibv_wc_status_str(IBV_WC_RETRY_EXC_ERR),
		      "transport retry counter exceeded"), "ibv_wc_status_str");
	errno = 0;
	CHECK(!ibv_open_device(NULL) && errno == EINVAL, "ibv_open_device(NULL)");
	check_errnos(list);
	check_rc(list);
	check_ud(list);
	check_srq(list);
	check_close_frees_leftovers(list);
	ibv_free_device_list(list);
	printf("verbs_semantics: ok\n");
	return 0;
}
