//! The TUN side: the gateway's `intragate0` device and the loop that reads
//! packets from the internal network and hands them to users' tunnels.

use std::net::IpAddr;
use std::sync::Arc;

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tracing::{error, warn};
use tun_rs::{AsyncDevice, DeviceBuilder};

use crate::core::conntrack::{NatDrop, Outcome};
use crate::core::nat::NatPortTable;
use crate::core::route::{self, DropReason};
use crate::gateway::{LockedNat, Shared};
use crate::wire::ip;

/// Bytes zeroed at a time for the TUN read buffer; packets are split off it
/// without copying, so the allocation is amortized over many packets.
const READ_CHUNK: usize = 256 * 1024;
/// Largest packet the TUN device can hand us.
const MAX_PACKET: usize = 65535;

/// Create the TUN device with the gateway's own address in each pool, so
/// the kernel routes every pool to it.
pub fn create_tun(shared: &Shared) -> std::io::Result<AsyncDevice> {
    let cfg = &shared.config;
    let mut builder = DeviceBuilder::new().name(cfg.tun_name.clone()).mtu(cfg.mtu);
    let core = shared.core();
    let pools: Vec<(IpAddr, u8)> = core
        .pools()
        .map(|p| (p.gateway_addr(), p.cidr().prefix()))
        .collect();
    drop(core);
    let first_v4 = pools.iter().find(|(a, _)| a.is_ipv4()).copied();
    if let Some((IpAddr::V4(a), prefix)) = first_v4 {
        builder = builder.ipv4(a, prefix, None);
    }
    let dev = builder.build_async()?;
    for (addr, prefix) in pools {
        match addr {
            IpAddr::V4(a) if Some((addr, prefix)) != first_v4 => dev.add_address_v4(a, prefix)?,
            IpAddr::V6(a) => dev.add_address_v6(a, prefix)?,
            _ => {}
        }
    }
    Ok(dev)
}

/// Warn when the kernel will not forward between the TUN and the internal
/// network (the most common deployment mistake).
pub fn check_forwarding() {
    match std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward") {
        Ok(v) if v.trim() == "1" => {}
        Ok(_) => warn!(
            "net.ipv4.ip_forward is 0: users will reach only the gateway itself; \
             set it with 'sysctl -w net.ipv4.ip_forward=1' (or the container's sysctls)"
        ),
        Err(e) => warn!(error = %e, "cannot read net.ipv4.ip_forward"),
    }
}

/// Read packets from the TUN device and queue each to its user's tunnel.
pub async fn tun_reader(shared: Arc<Shared>, tun: Arc<AsyncDevice>) {
    let mut buf = BytesMut::new();
    let mut scratch = Vec::with_capacity(MAX_PACKET);
    loop {
        if buf.len() < MAX_PACKET {
            buf.clear();
            buf.reserve(READ_CHUNK);
            buf.resize(READ_CHUNK, 0);
        }
        let n = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = tun.recv(&mut buf[..]) => match r {
                Ok(n) => n,
                Err(e) => {
                    error!(error = %e, "TUN read failed; stopping the data plane");
                    shared.shutdown.cancel();
                    return;
                }
            },
        };
        let mut pkt = buf.split_to(n);
        from_network(&shared, &mut pkt, &mut scratch);
    }
}

/// One packet from the internal network: find the session (by intranet IP,
/// or by NAT port for packets to the NAT address), let conntrack decide
/// (replies, inbound rules, expectations; NAT translated back), queue it.
fn from_network(shared: &Shared, pkt: &mut BytesMut, scratch: &mut Vec<u8>) {
    let Ok(info) = ip::parse(pkt) else {
        shared.stats.drop(DropReason::Malformed);
        return;
    };
    if route::is_link_scoped(&info) {
        shared.stats.drop(DropReason::LinkLocal);
        return;
    }
    let nat_addr = shared.config.nat.address;
    let user_addr = if nat_addr == Some(info.dst) {
        let owner = crate::core::nat::inbound_nat_key(pkt)
            .ok()
            .and_then(|(proto, port)| LockedNat(&shared.nat_ports).lookup(proto, port));
        match owner {
            Some(o) => o.addr,
            None => {
                shared.stats.nat_drop(NatDrop::NoNatMapping);
                return;
            }
        }
    } else {
        info.dst
    };
    let Some(port) = shared.routes.get(&user_addr).map(|p| p.value().clone()) else {
        shared.stats.drop(DropReason::NoSession);
        return;
    };
    let ctx = port.ctx(user_addr, true, &shared.config.nat.ftp_ports);
    let outcome = port.flows().inbound(
        &ctx,
        pkt,
        scratch,
        &mut LockedNat(&shared.nat_ports),
        Instant::now(),
    );
    match outcome {
        Ok(Outcome::Forward) => {
            let out = std::mem::take(pkt).freeze();
            shared.deliver(&port, out);
        }
        // Rare (the FTP ALG changed the length): one copy.
        Ok(Outcome::ForwardScratch) => shared.deliver(&port, Bytes::copy_from_slice(scratch)),
        Err(NatDrop::InboundDenied) => shared.stats.drop(DropReason::InboundDenied),
        Err(d) => shared.stats.nat_drop(d),
    }
}
