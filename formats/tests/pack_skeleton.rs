//! A pack's skeleton plus its payloads rebuild it byte for byte (the registry mapping), and
//! SIGN frames ride along without changing the root digest.

use serde_json::json;
use vmpack_formats::pack::*;

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_pack(path: &std::path::Path, compression: Compression, aligned: bool) {
    let mut data = noise(300_000, 3);
    data[100_000..200_000].fill(0);
    data[200_000..250_000].fill(b'a');
    let f = std::fs::File::create(path).unwrap();
    let mut w = PackWriter::new(
        f,
        WriteOptions {
            compression,
            aligned,
            chunk_size: 8192,
            ..Default::default()
        },
    )
    .unwrap();
    let small = b"{\"x\": 1}".to_vec();
    w.add_section(kind::MANIFEST, "manifest", json!({}), &small, &())
        .unwrap();
    w.add_section(kind::MEMORY, "memory/0", json!({"gpa": 0}), &data, &())
        .unwrap();
    w.add_section(kind::DISK, "disk/0", json!({}), &Vec::new(), &())
        .unwrap();
    w.finish().unwrap();
}

fn rebuild(src: &std::path::Path, skel: &Skeleton) -> Vec<u8> {
    let r = PackReader::open(src).unwrap();
    let mut out = Vec::new();
    let mut buf = Vec::new();
    skel.write_pack(&mut out, &mut |c, w| {
        r.read_payload(c, true, &mut buf)
            .map_err(std::io::Error::other)?;
        w.write_all(&buf)
    })
    .unwrap();
    out
}

#[test]
fn skeleton_rebuilds_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (c, aligned)) in [
        (Compression::None, true),
        (Compression::None, false),
        (Compression::Zstd, false),
        (Compression::Deflate, true),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("p{i}.vmpack"));
        write_pack(&p, c, aligned);
        let r = PackReader::open(&p).unwrap();
        let skel = r.skeleton().unwrap();
        // A skeleton received from elsewhere passes the same checks.
        let again = Skeleton::new(
            "x",
            *skel.header(),
            skel.index_frame().to_vec(),
            skel.index_offset(),
            vec![],
        )
        .unwrap();
        assert_eq!(again.root_digest(), r.root_digest());
        assert_eq!(skel.file_size(), r.file_size());
        assert_eq!(
            rebuild(&p, &skel),
            std::fs::read(&p).unwrap(),
            "{c} {aligned}"
        );
    }
}

#[test]
fn signatures_keep_the_root_digest_and_every_reader_accepts_them() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.vmpack");
    write_pack(&p, Compression::None, true);
    let r = PackReader::open(&p).unwrap();
    assert!(r.signatures().unwrap().is_empty());
    let signed = dir.path().join("signed.vmpack");
    let mut f = std::fs::File::create(&signed).unwrap();
    let sigs = vec![b"first".to_vec(), vec![7u8; 3000]];
    let n = r.write_with_signatures(sigs.clone(), &mut f).unwrap();
    drop(f);
    assert_eq!(n, std::fs::metadata(&signed).unwrap().len());
    let s = PackReader::open(&signed).unwrap();
    assert_eq!(s.root_digest(), r.root_digest());
    assert_eq!(s.signatures().unwrap(), sigs);
    s.verify(&()).unwrap();
    // Streaming reads accept and skip them.
    let bytes = std::fs::read(&signed).unwrap();
    let mut sr = StreamReader::new(&bytes[..], "signed").unwrap();
    loop {
        if let StreamEvent::End(sum) = sr.next_event().unwrap() {
            assert_eq!(sum.root_digest, r.root_digest());
            break;
        }
    }
    // The skeleton carries them; re-signing replaces them; removing them gives the original.
    let skel = s.skeleton().unwrap();
    assert_eq!(skel.signatures(), &sigs[..]);
    assert_eq!(rebuild(&signed, &skel), bytes);
    let unsigned = skel.with_signatures(vec![]).unwrap();
    assert_eq!(rebuild(&signed, &unsigned), std::fs::read(&p).unwrap());
    let mut f2 = std::fs::File::create(dir.path().join("re.vmpack")).unwrap();
    s.write_with_signatures(vec![], &mut f2).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("re.vmpack")).unwrap(),
        std::fs::read(&p).unwrap()
    );

    // A byte flipped inside a SIGN frame's tag is refused by full verification.
    let mut bad = bytes.clone();
    let at = s.index_offset() as usize - (8 + 3000) - (8 + 5);
    assert_eq!(&bad[at..at + 4], b"SIGN");
    bad[at] = b'X';
    let badp = dir.path().join("bad.vmpack");
    std::fs::write(&badp, &bad).unwrap();
    let e = PackReader::open(&badp).unwrap().verify(&()).unwrap_err();
    assert!(e.to_string().contains(&format!("file offset {at}")), "{e}");
}
