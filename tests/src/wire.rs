//! A stand-in for a guest on a VM's real tap: what a guest whose kernel is
//! the attacker's could put on the wire. The test attaches to the tap of a
//! *stopped* VM (its table, route and tap stay), sends TCP SYNs from the
//! guest's MAC with any source address through the host as gateway, answers
//! the host's ARP for that address, and reports whether the destination
//! answered (SYN-ACK or RST). Real frames through the real nftables rules:
//! no rule text is read.
//!
//! The tap carries a `virtio_net_hdr` before each frame (the launcher makes
//! it with `IFF_VNET_HDR`, as QEMU uses it); an all-zero header means no
//! offload.

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// `sizeof(struct virtio_net_hdr)`.
const VNET_HDR: usize = 10;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const TCP: u8 = 6;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The guest's side of a tap.
pub struct Wire {
    tap: File,
    mac: [u8; 6],
    gateway_mac: [u8; 6],
    source_port: u16,
}

fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {text:?}"))
}

/// The Internet checksum of `data` (with `initial` folded in).
fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

impl Wire {
    /// Attaches to `tap` as the guest whose MAC is `mac` (the tap must have
    /// no VMM attached: stop the VM first).
    ///
    /// # Errors
    /// If the tap cannot be opened or its MAC read.
    pub fn attach(tap: &str, mac: &str) -> Result<Self> {
        let fd = nestbox_launcher::net::tap::open(tap)?;
        let gateway = std::fs::read_to_string(format!("/sys/class/net/{tap}/address"))
            .with_context(|| format!("the MAC of {tap}"))?;
        let file = File::from(fd);
        nix::fcntl::fcntl(
            &file,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        Ok(Self {
            tap: file,
            mac: parse_mac(mac)?,
            gateway_mac: parse_mac(&gateway)?,
            source_port: 40_000,
        })
    }

    fn send(&mut self, ethertype: u16, dst_mac: [u8; 6], payload: &[u8]) -> Result<()> {
        let mut frame = vec![0u8; VNET_HDR];
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&self.mac);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        self.tap.write_all(&frame).context("write to the tap")
    }

    /// An IPv4 TCP SYN from `src` to `dst:port`.
    fn syn_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
        let mut tcp = Vec::with_capacity(20);
        tcp.extend_from_slice(&sport.to_be_bytes());
        tcp.extend_from_slice(&dport.to_be_bytes());
        tcp.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // seq
        tcp.extend_from_slice(&0u32.to_be_bytes()); // ack
        tcp.extend_from_slice(&[5 << 4, SYN]);
        tcp.extend_from_slice(&64_240u16.to_be_bytes()); // window
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&[0, TCP]);
        pseudo.extend_from_slice(&u16::try_from(tcp.len()).expect("20").to_be_bytes());
        pseudo.extend_from_slice(&tcp);
        let sum = checksum(&pseudo, 0);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let total = u16::try_from(20 + tcp.len()).expect("40");
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, TCP, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = checksum(&ip, 0);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&tcp);
        ip
    }

    /// Answers an ARP request in `frame` (after the virtio header) for
    /// `ip` with this guest's MAC.
    fn answer_arp(&mut self, frame: &[u8], ip: Ipv4Addr) -> Result<()> {
        let arp = &frame[14..];
        if arp.len() < 28 || arp[6..8] != [0, 1] || arp[24..28] != ip.octets() {
            return Ok(());
        }
        let mut reply = Vec::with_capacity(28);
        reply.extend_from_slice(&arp[..6]); // htype, ptype, hlen, plen
        reply.extend_from_slice(&[0, 2]); // reply
        reply.extend_from_slice(&self.mac);
        reply.extend_from_slice(&ip.octets());
        reply.extend_from_slice(&arp[8..14]); // the asker's MAC
        reply.extend_from_slice(&arp[14..18]); // and address
        let asker: [u8; 6] = arp[8..14].try_into().expect("6 bytes");
        self.send(ETHERTYPE_ARP, asker, &reply)
    }

    /// Sends a SYN from `src` to `dst:port` through the host and says
    /// whether anything answered it (SYN-ACK or RST) within `wait`.
    ///
    /// # Errors
    /// If the tap cannot be written or read.
    pub fn reaches(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        port: u16,
        wait: Duration,
    ) -> Result<bool> {
        self.source_port += 1;
        let sport = self.source_port;
        let packet = Self::syn_packet(src, dst, sport, port);
        self.send(ETHERTYPE_IPV4, self.gateway_mac, &packet)?;
        let deadline = Instant::now() + wait;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            let n = match self.tap.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(e).context("read from the tap"),
            };
            if n < VNET_HDR + 14 {
                continue;
            }
            let frame = buf[VNET_HDR..n].to_vec();
            let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
            if ethertype == ETHERTYPE_ARP {
                self.answer_arp(&frame, src)?;
                continue;
            }
            if ethertype != ETHERTYPE_IPV4 || frame.len() < 14 + 40 {
                continue;
            }
            let ip = &frame[14..];
            let header = usize::from(ip[0] & 0x0f) * 4;
            if ip[9] != TCP || ip[12..16] != dst.octets() || ip[16..20] != src.octets() {
                continue;
            }
            let tcp = &ip[header..];
            let (from, to) = (
                u16::from_be_bytes([tcp[0], tcp[1]]),
                u16::from_be_bytes([tcp[2], tcp[3]]),
            );
            let flags = tcp[13];
            if from == port && to == sport && (flags & (SYN | ACK) == SYN | ACK || flags & RST != 0)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_match_the_rfc_1071_example() {
        // RFC 1071's example bytes sum to 0xddf2 (ones' complement: 0x220d).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data, 0), 0x220d);
        // A packet with its checksum in place sums to zero.
        let p = Wire::syn_packet(Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1), 1, 2);
        assert_eq!(checksum(&p[..20], 0), 0);
        assert_eq!(
            parse_mac("02:6e:62:7b:00:02").unwrap(),
            [2, 0x6e, 0x62, 0x7b, 0, 2]
        );
    }
}
