use super::codec::decompress;
use super::layout::is_zero;
use super::*;

#[test]
fn zero_detection() {
    let mut v = vec![0u8; 100_003];
    assert!(is_zero(&v));
    assert!(is_zero(&v[1..]));
    for i in [0, 1, 15, 16, 50_000, 100_002] {
        v[i] = 1;
        assert!(!is_zero(&v), "{i}");
        assert!(!is_zero(&v[1..]) || i == 0);
        v[i] = 0;
    }
}

#[test]
fn decompression_bomb_refused() {
    let big = vec![0u8; 8 << 20];
    let z = zstd::bulk::compress(&big, 1).unwrap();
    let mut out = vec![0u8; 4096];
    let e = decompress(Codec::Zstd, &z, &mut out).unwrap_err();
    assert!(matches!(e, error::PackErrorKind::Decompress(_)), "{e}");
    let mut c = codec::Compressor::new(Compression::Deflate, None).unwrap();
    let mut d = Vec::new();
    // Compress 8 MiB of a pattern, then try to decode into a smaller buffer.
    let pat: Vec<u8> = (0..8 << 20).map(|i| (i % 7) as u8).collect();
    assert_eq!(c.compress(&pat, &mut d).unwrap(), Codec::Deflate);
    let e = decompress(Codec::Deflate, &d, &mut out).unwrap_err();
    assert!(matches!(e, error::PackErrorKind::Decompress(_)), "{e}");
    // Too short an output is refused as well: declared longer than the stream.
    let mut long = vec![0u8; (8 << 20) + 1];
    assert!(decompress(Codec::Deflate, &d, &mut long).is_err());
    let mut exact = vec![0u8; 8 << 20];
    decompress(Codec::Deflate, &d, &mut exact).unwrap();
    assert_eq!(exact, pat);
}

#[test]
fn incompressible_stored_raw() {
    let mut x = 0x12345678u64;
    let data: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for c in [Compression::Deflate, Compression::Zstd] {
        let mut comp = codec::Compressor::new(c, None).unwrap();
        let mut out = Vec::new();
        assert_eq!(comp.compress(&data, &mut out).unwrap(), Codec::None);
    }
}

#[test]
fn header_flag_bits_1_to_15_are_refused_unless_known() {
    // Bit 1 (overlays) is known; an unknown required bit (here bit 2) is refused, which is
    // what a reader from before bit 1 does to a live save's pack.
    let h = super::layout::encode_header(true, true);
    let parsed = super::layout::parse_header(&h).unwrap();
    assert!(parsed.aligned && parsed.overlays);
    let mut unknown = h;
    unknown[12] |= 1 << 2;
    let e = super::layout::parse_header(&unknown)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("unknown required header flags 0x7"), "{e}");
    // Bits 16-31 are optional: ignored.
    let mut optional = super::layout::encode_header(false, false);
    optional[14] = 1;
    assert!(!super::layout::parse_header(&optional).unwrap().overlays);
}
