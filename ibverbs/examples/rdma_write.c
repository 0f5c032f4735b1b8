/*
 * An ordinary libibverbs program, built against the system's <infiniband/verbs.h> and
 * linked with -libverbs, that runs over vrdma when the shim is preloaded:
 *
 *   cc -O2 -Wall -o rdma_write ibverbs/examples/rdma_write.c -libverbs
 *   LD_PRELOAD=target/release/libvrdma_ibverbs.so \
 *   VRDMA_SOCKETS=/run/vrdma/vm1.sock:/run/vrdma/vm2.sock ./rdma_write
 *
 * It opens the first two devices (two VMs), connects an RC QP on each to the other by LID,
 * RDMA-WRITEs a buffer from the first to the second, SENDs a message the same way, checks
 * every byte on the receiving side and prints "rdma_write: ok". Buffers come from malloc and
 * posix_memalign, as applications allocate them.
 */
#include <infiniband/verbs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SIZE (64 * 1024)
#define MSG 1000

struct side {
	struct ibv_context *ctx;
	struct ibv_pd *pd;
	struct ibv_cq *cq;
	struct ibv_qp *qp;
	struct ibv_mr *mr;
	char *buf;
	uint16_t lid;
};

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void open_side(struct ibv_device *dev, struct side *s, int memalign)
{
	struct ibv_port_attr port;
	struct ibv_qp_init_attr init = {
		.cap = { .max_send_wr = 16, .max_recv_wr = 16, .max_send_sge = 1, .max_recv_sge = 1 },
		.qp_type = IBV_QPT_RC,
	};
	struct ibv_qp_attr attr = {
		.qp_state = IBV_QPS_INIT,
		.port_num = 1,
		.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE,
	};

	s->ctx = ibv_open_device(dev);
	if (!s->ctx)
		die("ibv_open_device");
	if (ibv_query_port(s->ctx, 1, &port))
		die("ibv_query_port");
	s->lid = port.lid;
	s->pd = ibv_alloc_pd(s->ctx);
	if (!s->pd)
		die("ibv_alloc_pd");
	s->cq = ibv_create_cq(s->ctx, 32, NULL, NULL, 0);
	if (!s->cq)
		die("ibv_create_cq");
	if (memalign) {
		if (posix_memalign((void **)&s->buf, 4096, SIZE))
			die("posix_memalign");
	} else {
		s->buf = malloc(SIZE);
		if (!s->buf)
			die("malloc");
	}
	memset(s->buf, 0, SIZE);
	s->mr = ibv_reg_mr(s->pd, s->buf, SIZE,
			   IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
	if (!s->mr)
		die("ibv_reg_mr");
	init.send_cq = s->cq;
	init.recv_cq = s->cq;
	s->qp = ibv_create_qp(s->pd, &init);
	if (!s->qp)
		die("ibv_create_qp");
	if (ibv_modify_qp(s->qp, &attr,
			  IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS))
		die("ibv_modify_qp INIT");
}

static void connect_to(struct side *s, const struct side *peer)
{
	struct ibv_qp_attr attr = {
		.qp_state = IBV_QPS_RTR,
		.path_mtu = IBV_MTU_1024,
		.dest_qp_num = peer->qp->qp_num,
		.rq_psn = 0,
		.max_dest_rd_atomic = 1,
		.min_rnr_timer = 12,
		.ah_attr = { .dlid = peer->lid, .port_num = 1 },
	};
	int rc;

	rc = ibv_modify_qp(s->qp, &attr,
			   IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN |
			   IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
	if (rc) {
		fprintf(stderr, "ibv_modify_qp RTR: %s\n", strerror(rc));
		exit(1);
	}
	attr.qp_state = IBV_QPS_RTS;
	attr.timeout = 14;
	attr.retry_cnt = 7;
	attr.rnr_retry = 7;
	attr.sq_psn = 0;
	attr.max_rd_atomic = 1;
	rc = ibv_modify_qp(s->qp, &attr,
			   IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
			   IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC);
	if (rc) {
		fprintf(stderr, "ibv_modify_qp RTS: %s\n", strerror(rc));
		exit(1);
	}
}

static void wait_one(struct ibv_cq *cq, uint64_t wr_id)
{
	struct ibv_wc wc;
	int n;

	do {
		n = ibv_poll_cq(cq, 1, &wc);
	} while (n == 0);
	if (n < 0)
		die("ibv_poll_cq");
	if (wc.status != IBV_WC_SUCCESS || wc.wr_id != wr_id) {
		fprintf(stderr, "completion %llu: %s\n", (unsigned long long)wc.wr_id,
			ibv_wc_status_str(wc.status));
		exit(1);
	}
}

int main(void)
{
	struct ibv_device **list;
	struct side a, b;
	int num, i;

	list = ibv_get_device_list(&num);
	if (!list || num < 2) {
		fprintf(stderr, "rdma_write: needs two devices (VRDMA_SOCKETS=vm1.sock:vm2.sock)\n");
		return 1;
	}
	open_side(list[0], &a, 0);
	open_side(list[1], &b, 1);
	connect_to(&a, &b);
	connect_to(&b, &a);

	for (i = 0; i < SIZE; i++)
		a.buf[i] = (char)(i * 7 + 3);

	struct ibv_sge sge = { .addr = (uintptr_t)a.buf, .length = SIZE, .lkey = a.mr->lkey };
	struct ibv_send_wr wr = {
		.wr_id = 1, .sg_list = &sge, .num_sge = 1,
		.opcode = IBV_WR_RDMA_WRITE, .send_flags = IBV_SEND_SIGNALED,
		.wr.rdma = { .remote_addr = (uintptr_t)b.buf, .rkey = b.mr->rkey },
	}, *bad;
	if (ibv_post_send(a.qp, &wr, &bad))
		die("ibv_post_send WRITE");
	wait_one(a.cq, 1);
	if (memcmp(a.buf, b.buf, SIZE)) {
		fprintf(stderr, "rdma_write: the written buffer differs\n");
		return 1;
	}

	struct ibv_sge rsge = { .addr = (uintptr_t)b.buf, .length = MSG, .lkey = b.mr->lkey };
	struct ibv_recv_wr rwr = { .wr_id = 2, .sg_list = &rsge, .num_sge = 1 }, *rbad;
	if (ibv_post_recv(b.qp, &rwr, &rbad))
		die("ibv_post_recv");
	memset(a.buf, 0x5a, MSG);
	sge.length = MSG;
	wr.wr_id = 3;
	wr.opcode = IBV_WR_SEND;
	if (ibv_post_send(a.qp, &wr, &bad))
		die("ibv_post_send SEND");
	wait_one(a.cq, 3);
	wait_one(b.cq, 2);
	for (i = 0; i < MSG; i++)
		if (b.buf[i] != 0x5a) {
			fprintf(stderr, "rdma_write: received byte %d differs\n", i);
			return 1;
		}

	ibv_destroy_qp(a.qp);
	ibv_destroy_qp(b.qp);
	ibv_dereg_mr(a.mr);
	ibv_dereg_mr(b.mr);
	ibv_destroy_cq(a.cq);
	ibv_destroy_cq(b.cq);
	ibv_dealloc_pd(a.pd);
	ibv_dealloc_pd(b.pd);
	ibv_close_device(a.ctx);
	ibv_close_device(b.ctx);
	ibv_free_device_list(list);
	free(a.buf);
	free(b.buf);
	printf("rdma_write: ok\n");
	return 0;
}
